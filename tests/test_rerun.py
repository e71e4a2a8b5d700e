"""The command of a run, run again: a finished run never changes, a run killed during its final save completes the
save and trains nothing, and a resumed run's counts go on from its checkpoint's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, TINY_MODEL, write_recipe

pytestmark = pytest.mark.slow  # whole training runs


def recipe(folder: Path, **changes) -> Path:
    values = {"model_name_or_path": TINY_MODEL, "dataset_name": "embedded:infinity-instruct-sample",
              "per_device_train_batch_size": 4, "max_steps": 6, "learning_rate": 3.0e-3, "lr_scheduler_type": "constant",
              "max_length": 128, "gradient_checkpointing": False, "eval_strategy": "no", "test_split_size": 0,
              "logging_steps": 1, "save_steps": 3, "seed": 42, "report_to": "none", "eval_samples": 0,
              "resume_from_checkpoint": "auto", **changes}
    return write_recipe(folder / "recipe.yaml", **values)


def run(recipe_file: Path, output: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "sftkit", "--config", str(recipe_file), "--output_dir",
                             str(output), *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def snapshot(output: Path) -> dict[str, bytes]:
    return {path.relative_to(output).as_posix(): path.read_bytes() for path in sorted(output.rglob("*"))
            if path.is_file() and path.name not in ("loss.png",)}


def test_a_finished_run_run_again_says_so_and_changes_nothing(tmp_path):
    output = tmp_path / "out"
    run(recipe(tmp_path), output)
    before = snapshot(output)
    again = run(recipe(tmp_path), output)
    assert "holds a finished run (step 6 of 6, its model saved): nothing to train" in again.stderr
    assert "training finished" not in again.stdout and snapshot(output) == before


def test_a_run_killed_during_its_final_save_completes_it_and_trains_nothing(tmp_path):
    output = tmp_path / "out"
    run(recipe(tmp_path), output)
    model = (output / "model.safetensors").read_bytes()
    assert model == (output / "checkpoint-6" / "model.safetensors").read_bytes()
    # What a kill in the middle of the final save leaves: a half-written model, no result recorded.
    (output / "model.safetensors").write_bytes(model[: len(model) // 2])
    record = yaml.safe_load((output / "sftkit_run.yaml").read_text())
    del record["result"]
    (output / "sftkit_run.yaml").write_text(yaml.safe_dump(record))
    again = run(recipe(tmp_path), output)
    assert "final save did not complete: completing it from checkpoint-6, training nothing" in again.stderr
    assert (output / "model.safetensors").read_bytes() == model
    assert not (output / "checkpoint-7").exists() and "training finished" not in again.stdout
    assert yaml.safe_load((output / "sftkit_run.yaml").read_text())["result"]["steps"] == 6
    assert "nothing to train" in run(recipe(tmp_path), output).stderr  # and now it is a finished run


def test_a_resumed_run_counts_on_from_its_checkpoint(tmp_path):
    """Three steps, then the same recipe with six: its tokens (summary, run record, the history loss.png draws) are
    the uninterrupted run's, and the log says where it resumed."""
    whole = tmp_path / "whole"
    run(recipe(tmp_path), whole)
    resumed = tmp_path / "resumed"
    run(recipe(tmp_path), resumed, "--max_steps", "3")
    second = run(recipe(tmp_path), resumed)
    assert "resuming from checkpoint-3 (step 3 of 6)" in second.stderr
    assert "missing keys" not in second.stderr  # the tied head is not missing from the checkpoint
    for folder in (whole, resumed):
        assert (folder / "sftkit_run.yaml").is_file()
    records = [yaml.safe_load((folder / "sftkit_run.yaml").read_text())["result"] for folder in (whole, resumed)]
    assert records[0]["tokens_trained"] == records[1]["tokens_trained"] > 0
    histories = [json.loads((folder / "trainer_state.json").read_text())["log_history"] for folder in (whole, resumed)]
    tokens = [[entry["num_tokens"] for entry in history if "loss" in entry] for history in histories]
    assert tokens[0] == tokens[1]
    summary = second.stdout.split("training finished", 1)[1]
    assert f"{records[0]['tokens_trained']:,} trained" in summary
