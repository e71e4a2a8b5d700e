"""configs/slurm/train.sbatch: SLURM's warning before the time limit saves a checkpoint, the job requeues itself, and
the requeued job resumes on the curve it would have followed.

The script runs here as SLURM runs it, with bash (its #SBATCH lines are comments to bash), the variables of a
one-node job set and the signal sent where SLURM sends it: to the batch shell. `srun` and `scontrol` are small
stand-ins for the cluster, first on PATH (a real srun outside an allocation would ask for a new job, and a real
`scontrol requeue` would requeue the job running the tests). The srun stand-in does what srun and slurmstepd do
with signals: SIGUSR1 goes to every process of the step, SIGTERM kills the step, and the processes its tasks leave
behind are killed when they end. The fast tests drive the script's decisions with an srun that records what it
is asked to run; the slow ones train.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, TINY_MODEL, write_recipe

from sftkit.train.checkpoints import latest_checkpoint
from sftkit.train.shutdown import STOP_SIGNALS

SCRIPT = ROOT / "configs" / "slurm" / "train.sbatch"
MAX_STEPS = 6
LOSS_TOLERANCE = 1e-5  # several processes against one: relative, as tests/test_distributed.py explains

SCONTROL = """#!/bin/bash
# scontrol for the tests: `scontrol requeue JOBID` notes the job id beside this file; nothing else is stood in for.
if [[ $1 != requeue ]]; then
    echo "scontrol stand-in: $*: not stood in for" >&2
    exit 1
fi
echo "$2" >> "$(dirname "$0")/requeued"
"""

# Runs the command once per task on this one node, as srun does inside a one-node allocation.
TRAINING_SRUN = '''#!{python}
"""srun of a one-node step: the command once per task, with the task's variables. As srun and slurmstepd do, it
passes SIGUSR1 and SIGUSR2 to every process of the step (slurmstepd signals the step's whole cgroup), answers
SIGTERM, SIGHUP and SIGQUIT with SIGKILL, and kills what the tasks leave behind once they have ended."""
import ctypes, os, signal, subprocess, sys
import psutil

ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: processes orphaned by a task stay in the step
arguments, tasks = sys.argv[1:], 1
while arguments[0].startswith("--"):
    option = arguments.pop(0)
    if option.startswith("--ntasks-per-node="):
        tasks = int(option.partition("=")[2])

def signal_step(signum, frame=None):
    sent = signal.SIGKILL if signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT) else signum
    for process in psutil.Process().children(recursive=True):
        try:
            process.send_signal(sent)
        except psutil.NoSuchProcess:
            pass

for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(signum, signal_step)
step = {{"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": str(tasks), "SLURM_NODEID": "0"}}
running = [subprocess.Popen(arguments, env={{**os.environ, **step, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)}})
           for task in range(tasks)]
codes = [task.wait() for task in running]
signal_step(signal.SIGKILL)
sys.exit(max(code if code >= 0 else 128 - code for code in codes))
'''

# Records what it was asked to run and the signals it got; ends as the test says, or as the step would on a signal.
RECORDING_SRUN = """#!/bin/bash
here=$(dirname "$0")
trap 'echo USR1 >> "$here/srun-signals"; exit 1' USR1  # the training processes saved a checkpoint and stopped
trap 'echo TERM >> "$here/srun-signals"; exit 137' TERM  # srun kills the step
printf '%s\\n' "$@" > "$here/srun-arguments"
for _ in $(seq "$SRUN_TENTHS"); do sleep 0.1; done
exit "$SRUN_EXIT"
"""


def sbatch_options(script: Path) -> list[str]:
    """The #SBATCH options, read as sbatch reads them: up to the first command, an unescaped # starting a comment."""
    options = []
    for line in script.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            options += line.removeprefix("#SBATCH").split("#")[0].split()
    return options


def stand_ins(folder: Path, srun: str) -> Path:
    folder.mkdir()
    for name, text in (("srun", srun), ("scontrol", SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def free_job_id() -> int:
    """A job id whose port (sftkit launch uses 10000 + id % 20000 on SLURM) is free here."""
    for job_id in random.sample(range(20000), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", 10000 + job_id))
            except OSError:
                continue
            return job_id
    pytest.skip("no free port between 10000 and 29999")


def job_environment(bin_dir: Path, job_id: int, gpus_on_node: int = 1, restarts: int = 0, **more: str) -> dict:
    """What SLURM sets for the batch script of a one-node job with --ntasks-per-node=1 (the first start has no
    SLURM_RESTART_COUNT)."""
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": str(job_id),
                   "SLURM_JOB_NAME": "sftkit", "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
                   "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost", "SLURM_NTASKS": "1",
                   "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": str(gpus_on_node),
                   "SLURM_SUBMIT_DIR": str(ROOT), **more}
    if restarts:
        environment["SLURM_RESTART_COUNT"] = str(restarts)
    return environment


def requeued(bin_dir: Path) -> list[str]:
    record = bin_dir / "requeued"
    return record.read_text().split() if record.exists() else []


# ---------------------------------------------------------------- the script as written


def test_the_script_is_warned_with_a_signal_sftkit_stops_on_and_asks_to_be_requeued():
    options = sbatch_options(SCRIPT)
    assert "--requeue" in options and "--open-mode=append" in options and "--ntasks-per-node=1" in options
    warning = [option for option in options if option.startswith("--signal=")]
    assert len(warning) == 1
    target, name, lead = re.fullmatch(r"--signal=(B:)?(\w+)@(\d+)", warning[0]).groups()
    # B: SLURM signals the batch shell alone; the script passes it on to srun (srun answers SIGTERM with SIGKILL).
    assert target == "B:" and name == "USR1"
    assert getattr(signal, f"SIG{name}") in STOP_SIGNALS
    assert int(lead) >= 120  # SLURM may send it up to 60 s early; one step and one save must fit in the rest
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0


def run_with_recording_srun(tmp_path: Path, exit_code: int, tenths: int, send: signal.Signals | None = None
                            ) -> tuple[int, str, Path]:
    """The script run with an srun that runs nothing; ``send`` goes to the batch shell once srun has started."""
    bin_dir = stand_ins(tmp_path / "bin", RECORDING_SRUN)
    environment = job_environment(bin_dir, 4242, SRUN_EXIT=str(exit_code), SRUN_TENTHS=str(tenths))
    script = subprocess.Popen(["bash", str(SCRIPT), "my-run.yaml", "--max_steps", "5"], cwd=ROOT, env=environment,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if send is not None:
        deadline = time.monotonic() + 30
        while not (bin_dir / "srun-arguments").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        script.send_signal(send)
    log, _ = script.communicate(timeout=60)
    return script.returncode, log, bin_dir


def test_every_start_of_the_job_launches_sftkit_once_a_node_resuming_from_the_latest_checkpoint(tmp_path):
    code, log, bin_dir = run_with_recording_srun(tmp_path, exit_code=0, tenths=0)
    assert code == 0, log
    # The launchers start with SIGUSR1 ignored; the user's own keys come after resume's, so that they win.
    assert (bin_dir / "srun-arguments").read_text().splitlines() == [
        "--ntasks-per-node=1", "bash", "-c", 'trap "" USR1; exec "$@"', "sftkit-launch",
        "sftkit", "launch", "--config", "my-run.yaml", "--resume_from_checkpoint", "auto", "--max_steps", "5"]
    assert requeued(bin_dir) == [] and "job 4242, start 1" in log


def test_the_warning_reaches_srun_and_the_stopped_job_asks_for_its_requeue(tmp_path):
    code, log, bin_dir = run_with_recording_srun(tmp_path, exit_code=0, tenths=300, send=signal.SIGUSR1)
    assert (bin_dir / "srun-signals").read_text().split() == ["USR1"], log
    assert requeued(bin_dir) == ["4242"] and code == 0, log
    assert "requeueing job 4242" in log


def test_a_job_that_fails_on_its_own_is_not_requeued(tmp_path):
    code, log, bin_dir = run_with_recording_srun(tmp_path, exit_code=1, tenths=0)
    assert code == 1 and requeued(bin_dir) == [], log


def test_sigterm_is_not_passed_to_srun_and_the_script_waits_for_the_step(tmp_path):
    """Preemption, scancel or the time limit: SLURM signals the training processes itself and requeues a preempted
    job; srun would answer SIGTERM with SIGKILL, and a script that ended at once would end the job."""
    code, log, bin_dir = run_with_recording_srun(tmp_path, exit_code=143, tenths=10, send=signal.SIGTERM)
    assert not (bin_dir / "srun-signals").exists(), log
    assert code == 143 and requeued(bin_dir) == [], log


# ---------------------------------------------------------------- the signal path, training


def recipe(folder: Path) -> Path:
    return write_recipe(
        folder / "recipe.yaml", model_name_or_path=TINY_MODEL, dataset_name="embedded:infinity-instruct-sample",
        per_device_train_batch_size=4, global_batch_size=8, max_steps=MAX_STEPS, learning_rate=3.0e-3,
        max_length=128, gradient_checkpointing=False, eval_strategy="no", test_split_size=0, logging_steps=1,
        save_steps=100, seed=42, report_to="none")


def run_job(recipe_file: Path, output: Path, environment: dict, warn_after_step: int | None = None
            ) -> tuple[int, str]:
    """The batch script run to its end; SIGUSR1 goes to the batch shell, as SLURM's B: sends it, once step
    ``warn_after_step`` is logged."""
    script = subprocess.Popen(["bash", str(SCRIPT), str(recipe_file), "--output_dir", str(output)], cwd=ROOT,
                              env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, logged = [], 0
    for line in script.stdout:
        lines.append(line)
        logged += "'loss':" in line
        if logged == warn_after_step:
            script.send_signal(signal.SIGUSR1)
            warn_after_step = None
    return script.wait(timeout=600), "".join(lines)


def losses(output: Path) -> list[float]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The job never warned: it trains to the end, and the script asks for no requeue."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    bin_dir = stand_ins(folder / "bin", TRAINING_SRUN.format(python=sys.executable))
    code, log = run_job(recipe(folder), folder / "out", job_environment(bin_dir, free_job_id()))
    assert code == 0 and "training finished" in log, log[-3000:]
    assert requeued(bin_dir) == []
    return folder / "out"


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_the_warning_saves_one_checkpoint_requeues_and_the_requeued_job_ends_on_the_uninterrupted_curve(
        tmp_path, uninterrupted, processes):
    bin_dir = stand_ins(tmp_path / "bin", TRAINING_SRUN.format(python=sys.executable))
    recipe_file, output, job_id = recipe(tmp_path), tmp_path / "out", free_job_id()
    code, log = run_job(recipe_file, output, job_environment(bin_dir, job_id, processes), warn_after_step=2)
    assert code == 0, log[-3000:]
    assert requeued(bin_dir) == [str(job_id)], log[-3000:]
    checkpoint = latest_checkpoint(output)
    assert checkpoint is not None, log[-3000:]
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 2 <= stopped_at < MAX_STEPS  # the step under way when the warning came, or the next
    assert [path.name for path in output.glob("checkpoint-*")] == [checkpoint.name]
    # Every process saved its part of the same step.
    assert sorted(path.name for path in checkpoint.glob("rng_state*.pth")) == (
        ["rng_state.pth"] if processes == 1 else ["rng_state_0.pth", "rng_state_1.pth"])
    assert f"after step {stopped_at}, saved in {checkpoint}" in log, log[-3000:]
    assert not (output / "model.safetensors").exists()

    code, log = run_job(recipe_file, output, job_environment(bin_dir, job_id, processes, restarts=1))
    assert code == 0 and f"job {job_id}, start 2" in log, log[-3000:]
    assert requeued(bin_dir) == [str(job_id)]  # finished: no second requeue
    assert f"resuming from {checkpoint.name}" in log and log.count("'loss':") == MAX_STEPS - stopped_at
    if processes == 1:
        assert losses(output) == losses(uninterrupted)
    else:
        assert losses(output) == pytest.approx(losses(uninterrupted), rel=LOSS_TOLERANCE)
