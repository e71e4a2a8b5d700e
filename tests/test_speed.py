"""Speed levers change how a run is computed, never what: defaults where the hardware has them, clean fallbacks."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from helpers import ROOT

from sftkit.speed import resolve_speed


def test_fused_adamw_is_the_default_on_cuda_only_and_an_explicit_optim_wins():
    values, notes = {}, []
    resolve_speed(values, notes, cuda=True)
    assert values["optim"] == "adamw_torch_fused" and notes
    values = {"optim": "adamw_torch"}
    resolve_speed(values, [], cuda=True)
    assert values["optim"] == "adamw_torch"
    values = {}
    resolve_speed(values, [], cuda=False)
    assert "optim" not in values


def test_levers_that_cannot_run_here_fall_back_and_say_so():
    values, notes = {"attn_implementation": "flex_attention"}, []
    resolve_speed(values, notes, cuda=False)
    assert values["attn_implementation"] == "sdpa" and "flex_attention needs a CUDA GPU" in notes[0]
    if importlib.util.find_spec("flash_attn") is None:
        values, notes = {"attn_implementation": "flash_attention_2"}, []
        resolve_speed(values, notes, cuda=True)
        assert values["attn_implementation"] == "sdpa" and "flash-attn" in notes[-1]
    if importlib.util.find_spec("liger_kernel") is None:
        values, notes = {"use_liger_kernel": True}, []
        resolve_speed(values, notes, cuda=True)
        assert values["use_liger_kernel"] is False and "liger-kernel" in notes[-1]


def test_gpu_benchmark_runs_its_cpu_paths(tmp_path):
    result = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--tiny", "--workdir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped on this machine (no CUDA GPU)" in result.stdout
    assert "| trl_best |" in result.stdout and "| sftkit |" in result.stdout
    assert "sftkit against trl_best: largest relative loss difference" in result.stdout
    assert "within 0.0001" in result.stdout  # in fp32 the fast path and plain TRL compute the same losses
