"""What a fixed set of runs trains, recorded: per-step losses and trained tokens of an eager, a lazy, a packed, a
streamed, a mixture and a two-process run, against tests/golden/runs.json.

The record holds sftkit's behaviour still while its insides change: a refactor of the data path or the job must
train these runs exactly as before. Token counts must be equal; losses within 1e-5 (the same code on another CPU
may round a sum differently). ``SFTKIT_RECORD_GOLDEN=1`` writes the record anew, for a change that is meant to
change what trains; say why in the commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, TINY_MODEL, write_recipe

pytestmark = pytest.mark.slow  # several processes, kills or whole training runs

GOLDEN = ROOT / "tests" / "golden" / "runs.json"
SAMPLE = ROOT / "sftkit" / "embedded" / "infinity-instruct-sample" / "train.jsonl"
COMMON = {"model_name_or_path": TINY_MODEL, "per_device_train_batch_size": 4, "global_batch_size": 8,
          "max_steps": 4, "learning_rate": 3.0e-3, "max_length": 128, "gradient_checkpointing": False,
          "eval_strategy": "no", "test_split_size": 0, "logging_steps": 1, "seed": 42, "report_to": "none",
          "eval_samples": 0, "assistant_only_loss": True}


def _parts(folder: Path) -> list[Path]:
    lines = SAMPLE.read_text().splitlines()
    paths = [folder / f"part{index}.jsonl" for index in range(3)]
    for index, path in enumerate(paths):
        path.write_text("\n".join(lines[index::3]) + "\n")
    return paths


RUNS = {
    "eager": lambda folder: {"dataset_name": "embedded:infinity-instruct-sample", "prepare": "eager"},
    "lazy": lambda folder: {"dataset_name": "embedded:infinity-instruct-sample", "prepare": "lazy"},
    "packed": lambda folder: {"dataset_name": "embedded:infinity-instruct-sample", "packing": True},
    "streamed": lambda folder: {"dataset_name": str(_parts(folder)[0]), "dataset_streaming": True},
    "mixture": lambda folder: {"datasets": [{"path": str(path), "fraction": share} for path, share
                                            in zip(_parts(folder), (0.5, 0.3, 0.2), strict=True)]},
    "ddp": lambda folder: {"dataset_name": "embedded:infinity-instruct-sample", "prepare": "eager"},
}


def trained(name: str, folder: Path) -> dict[str, list]:
    recipe = write_recipe(folder / f"{name}.yaml", **COMMON, **RUNS[name](folder))
    output = folder / name
    launcher = ["accelerate", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu" /
                                                              "ddp_2proc.yaml")] if name == "ddp" else [sys.executable]
    result = subprocess.run([*launcher, "-m", "sftkit", "--config", str(recipe), "--output_dir", str(output)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "loss" in entry]
    record = yaml.safe_load((output / "sftkit_run.yaml").read_text())
    return {"losses": [entry["loss"] for entry in steps], "tokens_seen": [entry["num_tokens"] for entry in steps],
            "tokens_trained": record["result"]["tokens_trained"]}


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


@pytest.mark.parametrize("name", RUNS)
def test_a_fixed_run_trains_what_it_trained_when_recorded(name, golden, tmp_path):
    got = trained(name, tmp_path)
    if os.environ.get("SFTKIT_RECORD_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({**json.loads(GOLDEN.read_text()), name: got} if GOLDEN.is_file()
                                     else {name: got}, indent=1) + "\n")
        pytest.skip("recorded")
    assert name in golden, f"no record of {name}: run with SFTKIT_RECORD_GOLDEN=1"
    expected = golden[name]
    assert got["tokens_trained"] == expected["tokens_trained"]
    assert got["tokens_seen"] == expected["tokens_seen"]
    assert got["losses"] == pytest.approx(expected["losses"], rel=1e-5)
