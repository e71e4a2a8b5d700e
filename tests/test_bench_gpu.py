"""The GPU benchmark's one command, dry, on a CPU: every configuration a CPU can run trains to the losses of the
one it is compared with, and a package missing from the wheels it installs stops it in the preflight, in seconds."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, python_without

pytestmark = pytest.mark.slow  # several processes, kills or whole training runs

_spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
bench_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_gpu)
CONFIGS = bench_gpu.CONFIGS


def test_gpu_benchmark_runs_every_configuration_a_cpu_can(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # --budget guards the GPU machine's time; here every configuration must run, however busy the CPU is.
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--tiny", "--workdir", str(tmp_path), "--budget", "1500"],
                            cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False,
                            env={**os.environ, "OUT": str(out)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = out / "bench.json"
    assert (out / "bench.log").read_text().strip().endswith(f"written: {report}")
    lines = result.stdout.splitlines()
    cuda_only = {"sftkit_liger", "sftkit_fsdp2"}
    skipped = next(line for line in lines if line.startswith("skipped on this machine (no CUDA GPU)"))
    assert all(f"{name} (" in skipped for name in cuda_only)
    ran = [name for name in CONFIGS if name not in cuda_only]
    for name in ran:
        assert any(line.startswith(f"| {name} | ") and "failed" not in line for line in lines), name
    # In fp32 every path computes what the one it is compared with computes: the losses agree to 1e-4.
    compared = [name for name in ran if CONFIGS[name].against]
    for name in compared:
        against = CONFIGS[name].against
        line = next(line for line in lines if line.startswith(f"{name} against {against}: largest relative loss"))
        assert line.endswith(", within 0.0001"), line
    # Paths a CPU runs as the very computation they are compared with say so beside the table.
    on_cpu = next(line for line in lines if line.startswith("on a CPU (fp32, sdpa): "))
    assert f"trl_mixed: {bench_gpu.BF16_ON_CPU}" in on_cpu and "sftkit_sdpa: the same computation" in on_cpu
    assert "sftkit_zero2     DEEPSPEED;" in result.stdout  # the launcher config really ran DeepSpeed
    written = json.loads(report.read_text())
    assert list(written["results"]) == ran and sorted(written["skipped"]) == sorted(cuda_only)
    assert len(written["loss_comparisons"]) == len(compared)
    assert all(comparison["within"] for comparison in written["loss_comparisons"])
    assert written["environment"]["device"] == "cpu" and written["environment"]["trl"]


def test_a_package_missing_from_the_wheels_stops_in_the_preflight(tmp_path):
    """The GPU path for real: the wheels it installs (here sftkit's own) installed into a site directory, on a Python
    that has every package of this machine but deepspeed. One clear line, before the benchmark starts."""
    wheels = tmp_path / "wheels"
    source = tmp_path / "source"  # a copy: building in the checkout would leave a build/ folder there
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "outputs", "build", "*.egg-info", ".whl"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, timeout=300)
    environment = python_without(tmp_path, "deepspeed")
    environment["PYTHONPATH"] = environment["PYTHONPATH"].split(":", 1)[1]  # sftkit only from the installed wheel
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--workdir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False,
                            env={**environment, "WHEELS": str(wheels), "SITE": str(tmp_path / "installed"),
                                 "OUT": str(tmp_path)})
    assert result.returncode != 0
    assert (tmp_path / "installed" / "sftkit").is_dir()  # the wheel was installed first
    said = [line for line in (result.stdout + result.stderr).splitlines() if "preflight" in line]
    assert len(said) == 1 and said[0].startswith("gpu_check preflight: cannot import deepspeed: ModuleNotFoundError")
    assert "running trl_best" not in result.stdout
