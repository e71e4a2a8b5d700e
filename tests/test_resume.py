"""A killed run, started again with the same command, finishes as if it had never stopped.

Each case trains the embedded model (or, streamed, a mixture of three files made of it) for six steps with ``resume_from_checkpoint: auto``, a checkpoint every two
steps and ``save_total_limit: 1``; SIGKILL hits the whole process group at a random step (right after that step
is logged, so on a checkpoint step the kill lands in the middle of writing it); then the same command runs
again. Its per-step losses and final weights must equal an uninterrupted run's: exactly for one process, and
within the tolerances of ``test_distributed`` (the order two processes sum a gradient in) for two.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY_MODEL, write_recipe
from safetensors.torch import load_file

from sftkit.train.checkpoints import latest_checkpoint

pytestmark = pytest.mark.slow  # several processes, kills or whole training runs

MAX_STEPS = 6
PREPARATIONS = {"lazy": {"prepare": "lazy"}, "eager": {"prepare": "eager"}, "packed": {"packing": True},
                "streamed mixture": {"streaming": True}}
LAUNCHERS = ("one process", "ddp_2proc", "zero2_2proc")
SAMPLE = ROOT / "sftkit" / "embedded" / "infinity-instruct-sample" / "train.jsonl"
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5


def streamed_mixture(folder: Path) -> dict:
    """The embedded conversations as three local files, streamed at 0.5/0.3/0.2 of the trained tokens."""
    lines = SAMPLE.read_text().splitlines()
    paths = [folder / f"part{index}.jsonl" for index in range(3)]
    for index, path in enumerate(paths):
        path.write_text("\n".join(lines[index::3]) + "\n")
    return {"datasets": [{"path": str(path), "fraction": share} for path, share in zip(paths, (0.5, 0.3, 0.2),
                                                                                          strict=True)],
            "mixture": "over"}


def recipe(folder: Path, preparation: str) -> Path:
    data = streamed_mixture(folder) if preparation == "streamed mixture" else {
        "dataset_name": "embedded:infinity-instruct-sample"}
    return write_recipe(
        folder / f"{preparation}.yaml", model_name_or_path=TINY_MODEL, **data,
        per_device_train_batch_size=4, global_batch_size=8, max_steps=MAX_STEPS, learning_rate=3.0e-3, max_length=128,
        gradient_checkpointing=False, eval_strategy="no", test_split_size=0, logging_steps=1, save_steps=2,
        save_total_limit=1, seed=42, report_to="none", resume_from_checkpoint="auto", **PREPARATIONS[preparation])


def command(launcher: str, recipe_file: Path, output: Path) -> list[str]:
    sftkit = ["-m", "sftkit", "--config", str(recipe_file), "--output_dir", str(output)]
    if launcher == "one process":
        return [sys.executable, *sftkit]
    return ["accelerate", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu" / f"{launcher}.yaml"),
            *sftkit]


def run(arguments: list[str], kill_after_step: int | None = None) -> tuple[int, str]:
    """Run to the end, or SIGKILL every process of the run as soon as step ``kill_after_step`` is logged."""
    process = subprocess.Popen(arguments, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines, logged = [], 0
    for line in process.stdout:
        lines.append(line)
        logged += "'loss':" in line
        if logged == kill_after_step:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.stdout.close()
    return process.wait(timeout=600), "".join(lines)


def losses(output: Path) -> list[float]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, Path]:
    """One process, never stopped: eager and lazy runs train the same batches, so one run stands for both."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    outputs = {}
    for preparation in ("eager", "packed", "streamed mixture"):
        code, log = run(command("one process", recipe(folder, preparation), folder / preparation))
        assert code == 0, log[-3000:]
        outputs[preparation] = folder / preparation
    outputs["lazy"] = outputs["eager"]
    return outputs


# A stream is read by the data loader alone, whatever shards the model: one process and DDP cover it.
CASES = [(launcher, preparation) for launcher in LAUNCHERS for preparation in PREPARATIONS
         if not (preparation == "streamed mixture" and launcher == "zero2_2proc")]


@pytest.mark.parametrize(("launcher", "preparation"), CASES)
def test_a_killed_run_rerun_with_the_same_command_ends_as_if_never_stopped(tmp_path, uninterrupted, launcher,
                                                                             preparation):
    kill_after_step = random.randint(1, MAX_STEPS - 1)
    arguments = command(launcher, recipe(tmp_path, preparation), tmp_path / "out")
    code, log = run(arguments, kill_after_step)
    assert code == -signal.SIGKILL, log[-3000:]
    left = latest_checkpoint(tmp_path / "out")
    resumed_from = int(left.name.split("-")[1]) if left else 0
    # The last checkpoint written whole: on a checkpoint step the kill may have cut that step's checkpoint short.
    assert resumed_from in ({kill_after_step, kill_after_step - 2} if kill_after_step % 2 == 0 else {kill_after_step - 1})

    code, log = run(arguments)
    assert code == 0, log[-3000:]
    where = f"(killed after step {kill_after_step}, resumed from step {resumed_from})"
    assert log.count("'loss':") == MAX_STEPS - resumed_from, where  # it resumed, it did not start again
    reference = uninterrupted[preparation]
    finished, expected = load_file(tmp_path / "out" / "model.safetensors"), load_file(reference / "model.safetensors")
    if launcher == "one process":
        assert losses(tmp_path / "out") == losses(reference), where
        assert all(torch.equal(finished[name], expected[name]) for name in expected), where
    else:
        assert losses(tmp_path / "out") == pytest.approx(losses(reference), rel=LOSS_TOLERANCE), where
        for name in expected:
            torch.testing.assert_close(finished[name], expected[name], atol=WEIGHT_TOLERANCE, rtol=0, msg=where)
    assert [path.name for path in (tmp_path / "out").glob("checkpoint-*")] == [f"checkpoint-{MAX_STEPS}"]


# ---------------------------------------------------------------- which checkpoint, and under which recipe


def _checkpoint(output: Path, step: int, values: dict | None = None, processes: int = 1) -> Path:
    """A checkpoint folder as the trainer leaves it: trainer state, and the record of the recipe it was made with."""
    from sftkit.train.checkpoints import write_checkpoint_record

    folder = output / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text('{"global_step": 1, "max_steps": 1000}')
    if values is not None:
        write_checkpoint_record(folder, values, processes)
    return folder


def _load(tmp_path, **overrides):
    from sftkit.setup.resolve import load_recipe

    return load_recipe(str(recipe(tmp_path, "eager")), {"output_dir": str(tmp_path / "out"), **overrides})


def test_auto_resumes_the_latest_whole_checkpoint_and_starts_fresh_without_one(tmp_path):
    fresh = _load(tmp_path)
    assert fresh.training.resume_from_checkpoint is None
    assert any("no checkpoint in" in note and "starts fresh" in note for note in fresh.notes)
    _checkpoint(tmp_path / "out", 2)
    (tmp_path / "out" / "checkpoint-4").mkdir()  # cut short: no trainer state
    (tmp_path / "out" / ".sftkit-staging" / "checkpoint-6").mkdir(parents=True)  # never renamed
    assert _load(tmp_path).training.resume_from_checkpoint == str(tmp_path / "out" / "checkpoint-2")


def test_a_resume_that_changes_what_is_optimised_is_refused_with_the_differences(tmp_path):
    from sftkit.errors import SftkitError

    _checkpoint(tmp_path / "out", 2, _load(tmp_path).values)
    with pytest.raises(SftkitError, match=r"(?s)optimised something else.*learning_rate: 0\.003 -> 0\.001.*max_length"):
        _load(tmp_path, learning_rate=1e-3, max_length=64)
    with pytest.raises(SftkitError, match=r"rows per optimizer step: 8 -> 16"):
        _load(tmp_path, global_batch_size=16)
    # Where it writes, how long it runs and how fast it computes may change.
    resumed = _load(tmp_path, max_steps=12, logging_steps=2, save_steps=4, attn_implementation="eager")
    assert resumed.training.resume_from_checkpoint == str(tmp_path / "out" / "checkpoint-2")


def test_the_same_global_batch_on_another_number_of_processes_resumes(tmp_path):
    from sftkit.recipe import BatchGeometry
    from sftkit.train.checkpoints import differences

    values = _load(tmp_path).values  # one process: 4 rows x 2 accumulation steps
    checkpoint = _checkpoint(tmp_path / "out", 2, values)
    two_processes = {**values, "gradient_accumulation_steps": 1}  # 4 rows each: the same 8 rows a step
    assert differences(checkpoint, two_processes, BatchGeometry.recorded(two_processes, 2)) == []
    without_global_batch = {key: value for key, value in two_processes.items() if key != "global_batch_size"}
    assert differences(checkpoint, without_global_batch, BatchGeometry(4, 1, 4)) == [
        ("rows per optimizer step: 8 -> 16 (per_device_train_batch_size x gradient_accumulation_steps x processes; "
        "global_batch_size keeps it on any number of processes)")]
