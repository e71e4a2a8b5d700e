"""The GPU benchmark's CPU paths: every configuration a CPU can run trains to plain TRL's losses."""

from __future__ import annotations

import json
import os
import subprocess

from helpers import ROOT


def test_gpu_benchmark_runs_its_cpu_paths(tmp_path):
    """Through the GPU machine's one command, dry: every configuration a CPU can run trains, in fp32, to plain
    TRL's losses; the others are named as skipped."""
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--tiny", "--workdir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900, check=False,
                            env={**os.environ, "OUT": str(out)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = out / "bench.json"
    assert (out / "bench.log").read_text().strip().endswith(f"written: {report}")
    lines = result.stdout.splitlines()
    skipped = next(line for line in lines if line.startswith("skipped on this machine (no CUDA GPU)"))
    assert "sftkit_liger (" in skipped  # Liger's kernels are Triton: CUDA only
    ran = ["sftkit", "sftkit_bf16", "sftkit_sdpa", "sftkit_gc", "sftkit_compile"]
    for name in ["trl_best", *ran]:
        assert any(line.startswith(f"| {name} | ") and "failed" not in line for line in lines), name
    # In fp32 every path computes what plain TRL computes: the losses agree to 1e-4.
    for name, against in [(name, "trl_best") for name in ran] + [("sftkit_bf16", "sftkit")]:
        line = next(line for line in lines if line.startswith(f"{name} against {against}: largest relative loss"))
        assert line.endswith(", within 0.0001"), line
    written = json.loads(report.read_text())
    assert list(written["results"]) == ["trl_best", *ran] and list(written["skipped"]) == ["sftkit_liger"]
    assert len(written["loss_comparisons"]) == len(ran) + 1
    assert all(comparison["within"] for comparison in written["loss_comparisons"])
    assert written["environment"]["device"] == "cpu" and written["environment"]["trl"]
