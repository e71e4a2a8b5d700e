"""SIGTERM (what Kubernetes and SLURM send before they kill a job) saves a checkpoint, stops every process at the
same step and says how to go on; the same command then resumes from it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, TINY_MODEL, write_recipe

from sftkit.train.checkpoints import latest_checkpoint

pytestmark = pytest.mark.slow  # several processes, kills or whole training runs

MAX_STEPS = 8


def recipe(folder):
    return write_recipe(
        folder / "recipe.yaml", model_name_or_path=TINY_MODEL, dataset_name="embedded:infinity-instruct-sample",
        per_device_train_batch_size=4, global_batch_size=8, max_steps=MAX_STEPS, max_length=128, logging_steps=1,
        save_steps=100, eval_strategy="no", test_split_size=0, report_to="none", resume_from_checkpoint="auto")


def terminate_after(arguments: list[str], step: int) -> tuple[int, str, float]:
    """Run, send SIGTERM to the command's own process (as a scheduler does) once ``step`` is logged; the exit code,
    the output and the seconds from the signal to the end."""
    process = subprocess.Popen(arguments, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, logged, sent = [], 0, None
    for line in process.stdout:
        lines.append(line)
        logged += "'loss':" in line
        if logged == step and sent is None:
            process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
    code = process.wait(timeout=300)
    return code, "".join(lines), time.monotonic() - sent


def test_sigterm_saves_a_checkpoint_and_the_same_command_goes_on_from_it(tmp_path):
    arguments = [sys.executable, "-m", "sftkit", "--config", str(recipe(tmp_path)), "--output_dir", str(tmp_path / "out")]
    code, log, _ = terminate_after(arguments, step=2)
    checkpoint = latest_checkpoint(tmp_path / "out")
    assert code == 128 + signal.SIGTERM, log[-3000:]
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 2 <= stopped_at < MAX_STEPS  # the step under way when the signal came, or the next
    assert (f"sftkit: stopped on SIGTERM after step {stopped_at}, saved in {checkpoint}. Run the same command with "
            "resume_from_checkpoint: auto") in log
    assert not (tmp_path / "out" / "model.safetensors").exists()  # not a finished run

    done = subprocess.run(arguments, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("'loss':") == MAX_STEPS - stopped_at and "training finished" in done.stdout


def test_two_processes_stop_at_the_same_step_when_the_launcher_gets_sigterm(tmp_path):
    launcher = ROOT / "configs" / "accelerate" / "cpu" / "ddp_2proc.yaml"
    arguments = ["accelerate", "launch", "--config_file", str(launcher), "-m", "sftkit", "--config",
                 str(recipe(tmp_path)), "--output_dir", str(tmp_path / "out")]
    code, log, seconds = terminate_after(arguments, step=2)
    assert code != 0 and seconds < 60, log[-3000:]  # torchrun passes the signal on; nobody waits for a timeout
    checkpoint = latest_checkpoint(tmp_path / "out")
    assert checkpoint is not None and log.count(f"stopped on SIGTERM after step {checkpoint.name.split('-')[1]}") == 1
    assert sorted(path.name for path in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
