"""One bad-row policy: every reason is found before step 1, counted with row indices, then stops or skips the rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, TINY_MODEL, sharegpt_row, write_jsonl, write_recipe

from sftkit.data.preparation import prepare_data
from sftkit.errors import SftkitError
from sftkit.setup.resolve import load_recipe
from sftkit.train.model import load_tokenizer

GOOD = [("human", "What is 2 + 3?"), ("gpt", "2 + 3 = 5.")]
BAD = {  # reason -> the turns of a row that has exactly that problem
    "unknown role": [("human", "hi"), ("robot", "beep")],
    "empty content": [("human", "   "), ("gpt", "hello")],
    "no assistant turn": [("system", "Be brief."), ("human", "hi")],
    "malformed tool call": [("human", "weather?"), ("function_call", "{not json"), ("observation", "sunny"),
                            ("gpt", "Sunny.")],
    "does not end on a trained turn": [("human", "hi"), ("gpt", "hello"), ("human", "bye")],
    "too long": [("human", "word " * 300), ("gpt", "ok")],
    "no trained tokens": [("human", "word " * 300), ("gpt", "ok")],
    "rejected by adapter": [],
}


def rows_with(reasons: list[str], good: int = 12) -> list[dict]:
    rows = [sharegpt_row(index, *GOOD) for index in range(good)]
    rows += [sharegpt_row(good + offset, *BAD[reason]) for offset, reason in enumerate(reasons)]
    return rows


def prepare(tmp_path, rows, **keys):
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    values = dict(model_name_or_path=TINY_MODEL, dataset_name=str(data), output_dir=str(tmp_path / "out"),
                  max_length=128, report_to="none", **keys)
    recipe = load_recipe(str(write_recipe(tmp_path / "recipe.yaml", **values)))
    return prepare_data(recipe, load_tokenizer(recipe))


ALL_BUT_LENGTH = [reason for reason in BAD if reason not in ("too long", "no trained tokens")]


def test_every_reason_is_counted_with_its_rows(tmp_path):
    data = prepare(tmp_path, rows_with(ALL_BUT_LENGTH), on_invalid="skip", max_invalid_fraction=0.5)
    report = data.train.report
    assert dict(report.invalid) == {reason: 1 for reason in ALL_BUT_LENGTH}
    assert report.examples["unknown role"] == [(str(tmp_path / "rows.jsonl"), 12)] and report.valid == 12
    assert data.train.trainable().num_rows == 12


@pytest.mark.parametrize("long_rows, reason", [("skip", "too long"), ("truncate", "no trained tokens")])
def test_long_rows_are_skipped_or_truncated(tmp_path, long_rows, reason):
    data = prepare(tmp_path, rows_with([reason]), on_invalid="skip", max_invalid_fraction=0.5,
                   long_rows=long_rows, assistant_only_loss=True)
    assert dict(data.train.report.invalid) == {reason: 1}


def test_error_policy_stops_with_counts_and_the_first_problem(tmp_path):
    with pytest.raises(SftkitError) as error:
        prepare(tmp_path, rows_with(["unknown role", "unknown role", "empty content"]))
    message = str(error.value)
    assert "3 of 15 train rows are invalid" in message
    assert "2 unknown role (rows.jsonl rows 12, 13)" in message and "1 empty content (rows.jsonl row 14)" in message
    assert "First: rows.jsonl row 12: turn 1 has unknown role 'robot'" in message
    assert "on_invalid: skip" in message


def test_a_row_is_named_by_its_place_in_its_file_wherever_it_is_prepared(tmp_path):
    """Held-out rows change every row's place in the train split: the report still names the file's row, as
    skipped_rows.jsonl does."""
    rows = rows_with(["unknown role"], good=30)  # the bad row is the file's row 30
    data = prepare(tmp_path, rows, on_invalid="skip", max_invalid_fraction=0.5, test_split_size=0.2)
    split = data.train if data.train.report.invalid else data.eval
    assert "1 unknown role (rows.jsonl row 30)" in "\n".join(split.report.lines())
    assert split.report.first_problem().startswith("rows.jsonl row 30: ")
    data.write_skipped(str(tmp_path / "out"), resuming=False)
    [listed] = [json.loads(line) for line in (tmp_path / "out" / "skipped_rows.jsonl").read_text().splitlines()]
    assert (listed["source"], listed["source_row"]) == (str(tmp_path / "rows.jsonl"), 30)


def test_too_many_skipped_rows_stop_the_run(tmp_path):
    with pytest.raises(SftkitError, match="more than max_invalid_fraction 0.1"):
        prepare(tmp_path, rows_with(ALL_BUT_LENGTH), on_invalid="skip")


def test_a_run_where_every_row_is_bad_says_so(tmp_path):
    with pytest.raises(SftkitError, match="every one of the 3 train rows is invalid"):
        prepare(tmp_path, rows_with(["unknown role"] * 3, good=0), on_invalid="skip", max_invalid_fraction=1.0)


def test_skipped_rows_are_written_with_reason_and_raw_row(tmp_path):
    data = prepare(tmp_path, rows_with(["unknown role", "empty content"]), on_invalid="skip", max_invalid_fraction=0.5)
    assert data.write_skipped(str(tmp_path / "out"), resuming=False) == 2
    lines = [json.loads(line) for line in (tmp_path / "out" / "skipped_rows.jsonl").read_text().splitlines()]
    assert [(line["row"], line["reason"]) for line in lines] == [(12, "unknown role"), (13, "empty content")]
    assert lines[0]["data"]["conversations"][1] == {"from": "robot", "value": "beep"}


def test_a_resumed_run_keeps_the_rows_met_before_it_stopped_and_lists_none_twice(tmp_path):
    from sftkit.data.bad_rows import append_skipped, skipped_entry

    output = str(tmp_path / "out")
    data = prepare(tmp_path, rows_with(["unknown role", "empty content"]), on_invalid="skip", max_invalid_fraction=0.5)
    met = skipped_entry("train", 40, "empty content", "column 'value' is empty", "rows.jsonl", 40, {"x": 1}, "mid-run")
    data.write_skipped(output, resuming=False)
    append_skipped(output, [met])  # met mid-run by the run that was interrupted
    data.write_skipped(output, resuming=True)  # the resumed run starts its list again
    append_skipped(output, [met])  # and meets the row again, between the checkpoint and the interruption
    lines = [json.loads(line) for line in (tmp_path / "out" / "skipped_rows.jsonl").read_text().splitlines()]
    assert [(line["row"], line["met"]) for line in lines] == [(12, "before step 1"), (13, "before step 1"),
                                                               (40, "mid-run")]
    data.write_skipped(output, resuming=False)  # a fresh run's list is its own
    assert len((tmp_path / "out" / "skipped_rows.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_training_skips_bad_rows_and_records_them(tmp_path):
    rows = rows_with(["unknown role", "does not end on a trained turn"], good=30)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "sftkit", "--config", str(ROOT / "configs/recipes/quickstart.yaml"), "--dataset_name",
         str(data), "--output_dir", str(output), "--max_steps", "2", "--test_split_size", "0", "--eval_strategy", "no",
         "--eval_on_start", "false", "--on_invalid", "skip", "--prepare", "eager"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len((output / "skipped_rows.jsonl").read_text().splitlines()) == 2
    record = yaml.safe_load((output / "sftkit_run.yaml").read_text())
    assert record["data"]["train_rows"] == 30
    assert record["data"]["invalid_rows"]["train"] == {"unknown role": 1, "does not end on a trained turn": 1}


def _lazy_run(tmp_path, *overrides: str, bad: list | None = None,
              launcher: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, Path]:
    """600 rows; those that a lazy run's pre-flight sample leaves out are bad, so only training meets them."""
    from sftkit.data.passes import SAMPLE_ROWS
    from sftkit.data.render_guard import sample_indices

    sampled = set(sample_indices(600, SAMPLE_ROWS))
    rows = [sharegpt_row(index, *(GOOD if index in sampled else bad or BAD["unknown role"])) for index in range(600)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    output = tmp_path / "out"
    start = ["accelerate", "launch", *launcher, "-m", "sftkit"] if launcher else [sys.executable, "-m", "sftkit"]
    result = subprocess.run(
        [*start, "--config", str(ROOT / "configs/recipes/quickstart.yaml"), "--dataset_name",
         str(data), "--output_dir", str(output), "--max_steps", "12", "--test_split_size", "0", "--eval_strategy",
         "no", "--eval_on_start", "false", "--logging_steps", "1", "--prepare", "lazy", *overrides],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )
    return result, output


@pytest.mark.slow
def test_lazy_run_stops_cleanly_at_a_bad_row_after_saving_a_checkpoint(tmp_path):
    result, output = _lazy_run(tmp_path)
    assert result.returncode == 2
    assert "training stopped: an invalid row was met at step" in result.stderr
    assert "unknown role" in result.stderr and "Traceback" not in result.stderr
    assert list(output.glob("checkpoint-*")), "a checkpoint is saved before stopping"
    lines = [json.loads(line) for line in (output / "skipped_rows.jsonl").read_text().splitlines()]
    assert lines and all(line["met"] == "mid-run" and line["reason"] == "unknown role" for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])  # a GPU run prepares rows in data-loading workers by default
def test_lazy_run_skips_bad_rows_mid_run_and_counts_them(tmp_path, workers):
    result, output = _lazy_run(tmp_path, "--on_invalid", "skip", "--max_invalid_fraction", "0.8",
                               "--dataloader_num_workers", workers)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = next(line for line in result.stdout.splitlines() if line.startswith("rows "))
    drawn, invalid = (int(word.replace(",", "")) for word in summary.split() if word.replace(",", "").isdigit())
    assert drawn == 12 * 8 and 0 < invalid < drawn
    assert len((output / "skipped_rows.jsonl").read_text().splitlines()) == invalid
    record = yaml.safe_load((output / "sftkit_run.yaml").read_text())
    assert record["data"]["preparation"].startswith("lazy")
    assert record["result"]["rows_drawn"] == drawn and record["result"]["rows_invalid"] == invalid


@pytest.mark.slow
def test_rows_the_chat_template_rejects_mid_run_are_skipped_not_a_crash(tmp_path):
    """A strict template (Mistral's: roles alternate, no system turn) raises on rows outside the pre-flight sample:
    each is a row error with the template's message, skipped and listed, and the run finishes."""
    from chat_templates import MISTRAL

    template = tmp_path / "mistral.jinja"
    template.write_text(MISTRAL)
    result, output = _lazy_run(tmp_path, "--on_invalid", "skip", "--max_invalid_fraction", "0.8",
                               "--chat_template_path", str(template), bad=[("system", "Be brief."), *GOOD])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in (output / "skipped_rows.jsonl").read_text().splitlines()]
    assert lines and {line["reason"] for line in lines} == {"rejected by chat template"}
    assert "System role" in lines[0]["problem"] or "alternate" in lines[0]["problem"]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_rows_met_mid_run_by_every_process_are_listed(tmp_path):
    """Two processes: the rows each one meets are counted and listed once, by the main process."""
    result, output = _lazy_run(tmp_path, "--on_invalid", "skip", "--max_invalid_fraction", "0.8",
                               "--global_batch_size", "8", "--per_device_train_batch_size", "4",
                               launcher=("--config_file", str(ROOT / "configs/accelerate/cpu/ddp_2proc.yaml")))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = next(line for line in result.stdout.splitlines() if line.startswith("rows "))
    drawn, invalid = (int(word.replace(",", "")) for word in summary.split() if word.replace(",", "").isdigit())
    assert drawn == 12 * 8 and invalid > 0
    lines = [json.loads(line) for line in (output / "skipped_rows.jsonl").read_text().splitlines()]
    assert len(lines) == invalid and len({line["row"] for line in lines}) == invalid
