"""Runs that meet what real data and real tokenizers bring: a tokenizer without a pad token and micro-steps whose
rows are all invalid, rows a template cannot mask met mid-run, padding-free batches, rows cut to max_length."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, write_jsonl

from sftkit import embedded
from sftkit.data.passes import SAMPLE_ROWS
from sftkit.data.render_guard import sample_indices

pytestmark = pytest.mark.slow  # several processes, kills or whole training runs

QUICKSTART = ROOT / "configs/recipes/quickstart.yaml"


def run(output: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sftkit", "--config", str(QUICKSTART), "--output_dir", str(output), "--logging_steps",
         "1", "--eval_strategy", "no", "--eval_on_start", "false", "--test_split_size", "0", "--eval_samples", "0",
         *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def losses(output: Path) -> list[float]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def model_without_pad_token(root: Path) -> Path:
    """The embedded model with a tokenizer that has no pad token, as Llama's and Mistral's have none."""
    folder = root / "no-pad"
    shutil.copytree(embedded.resolve("embedded:tiny-qwen2"), folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["pad_token"] = None
    config_path.write_text(json.dumps(config))
    return folder


def rows_with_invalid(count: int, invalid: set[int]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {index} + 1?"},
                          {"role": "assistant", "content": "   " if index in invalid else f"{index + 1}."}]}
            for index in range(count)]


@pytest.mark.parametrize("prepare, extra", [("lazy", ()), ("eager", ()), ("eager", ("--fixed_batch_shape", "true"))])
def test_a_micro_step_of_invalid_rows_under_a_tokenizer_without_pad_token_trains_on(tmp_path, prepare, extra):
    """Batches of one row, every fifth invalid and skipped: those micro-steps hold no valid row. They step with the
    others (a padding token that trains nothing), whatever the tokenizer lacks."""
    data = write_jsonl(tmp_path / "rows.jsonl", rows_with_invalid(40, set(range(0, 40, 5))))
    output = tmp_path / "out"
    result = run(output, "--model_name_or_path", str(model_without_pad_token(tmp_path)), "--dataset_name", str(data),
                 "--per_device_train_batch_size", "1", "--max_steps", "12", "--on_invalid", "skip",
                 "--max_invalid_fraction", "0.5", "--prepare", prepare, "--max_length", "64", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(losses(output)) == 12


# Like DeepSeek-R1's template: the prompt opens every reply with <think>, which replies without reasoning lack.
FORCES_THINKING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>{% endif %}"
)


def test_rows_a_template_cannot_mask_met_mid_run_follow_the_bad_row_policy(tmp_path):
    """A lazy run meets rows whose reply the prompt does not open, which its sample checked before step 1 missed:
    counted and listed under on_invalid: skip; under on_invalid: error the run stops with a checkpoint, naming the
    row, instead of crashing."""
    sampled = set(sample_indices(2000, SAMPLE_ROWS))
    rows = [{"messages": [{"role": "user", "content": f"What is {index} + 1?"},
                          {"role": "assistant", "content": f"{index + 1}." if index % 3 == 0 and index not in sampled
                           else f"<think>{index} plus one</think>{index + 1}."}]} for index in range(2000)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    template = tmp_path / "forces-thinking.jinja"
    template.write_text(FORCES_THINKING)
    common = ("--dataset_name", str(data), "--chat_template_path", str(template), "--assistant_only_loss", "true",
              "--max_steps", "6", "--per_device_train_batch_size", "4", "--render_check_rows", "0")
    skipped = run(tmp_path / "skip", *common, "--on_invalid", "skip", "--max_invalid_fraction", "0.5")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    listed = [json.loads(line) for line in (tmp_path / "skip" / "skipped_rows.jsonl").read_text().splitlines()]
    assert listed and {entry["reason"] for entry in listed} == {"reply does not follow its prompt"}
    assert all(entry["data"]["messages"][1]["content"].startswith(("1", "2", "3", "4", "5", "6", "7", "8", "9"))
               for entry in listed)
    stopped = run(tmp_path / "error", *common, "--on_invalid", "error", "--save_steps", "100")
    assert stopped.returncode != 0
    message = stopped.stderr[stopped.stderr.rfind("sftkit: error"):]
    assert "reply does not follow its prompt" in message and "rows.jsonl row " in message, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert any(path.name.startswith("checkpoint-") for path in (tmp_path / "error").iterdir())


def test_padding_free_batches_train_the_losses_of_padded_ones(tmp_path):
    """Padding-free rows of a batch are concatenated and kept apart by their positions: the same losses."""
    padded = run(tmp_path / "padded", "--max_steps", "5")
    free = run(tmp_path / "free", "--max_steps", "5", "--padding_free", "true")
    assert padded.returncode == 0 and free.returncode == 0, free.stderr[-3000:]
    assert losses(tmp_path / "free") == pytest.approx(losses(tmp_path / "padded"), rel=1e-5)


def test_rows_cut_to_max_length_are_counted_in_the_log_the_summary_and_the_record(tmp_path):
    output = tmp_path / "out"
    result = run(output, "--max_steps", "2", "--max_length", "40", "--prepare", "eager")
    assert result.returncode == 0, result.stderr[-3000:]
    record = yaml.safe_load((output / "sftkit_run.yaml").read_text())
    noted = record["data"]["noted"]["train"]
    cut = noted["rows cut to max_length"]
    assert cut > 0 and noted["rows cut to max_length inside a trained reply (its stop marker not trained)"] <= cut
    assert f"noted: {cut:,} rows cut to max_length" in result.stderr  # the preparation log
    assert f"{cut:,} rows cut to max_length" in result.stdout.split("training finished", 1)[1]  # the summary
