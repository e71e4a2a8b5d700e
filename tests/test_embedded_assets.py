"""The embedded default dataset and tiny model must stay usable offline and reproducible."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = REPO_ROOT / "sftkit" / "embedded"
DATASET = EMBEDDED / "infinity-instruct-sample" / "train.jsonl"
MODEL_DIR = EMBEDDED / "tiny-qwen2"
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ROLE_MAP = {"system": "system", "human": "user", "gpt": "assistant"}


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in DATASET.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": ROLE_MAP[turn["from"]], "content": turn["value"]} for turn in row["conversations"]]


def test_dataset_has_infinity_instruct_schema(rows: list[dict[str, Any]]) -> None:
    assert 300 <= len(rows) <= 1000
    label_keys = {"ability_en", "ability_zh", "cate_ability_en", "cate_ability_zh"}
    for row in rows:
        assert set(row) == {"id", "conversations", "label", "langdetect", "source"}
        assert isinstance(row["id"], int)
        assert row["langdetect"] == "en" and isinstance(row["source"], str)
        assert set(row["label"]) == label_keys
        assert all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in row["label"].values())
        turns = row["conversations"]
        assert all(set(turn) == {"from", "value"} and turn["value"] for turn in turns)
        roles = [turn["from"] for turn in turns]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles in (["human", "gpt"], ["human", "gpt", "human", "gpt"])
    assert len({row["id"] for row in rows}) == len(rows)


def test_dataset_mixes_turn_shapes(rows: list[dict[str, Any]]) -> None:
    with_system = sum(row["conversations"][0]["from"] == "system" for row in rows)
    two_turn = sum(sum(t["from"] == "gpt" for t in row["conversations"]) == 2 for row in rows)
    assert 0.1 < with_system / len(rows) < 0.3
    assert 0.1 < two_turn / len(rows) < 0.5


def test_tokenizer_renders_qwen25_chatml(tokenizer) -> None:
    assert tokenizer.bos_token is None
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer(rendered)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2


def test_tokenizer_round_trips(tokenizer, rows: list[dict[str, Any]]) -> None:
    texts = [tokenizer.apply_chat_template(to_messages(row), tokenize=False) for row in rows[:100]]
    texts.append("Unseen text: naïve café, 你好, emoji 🙂, tabs\tand\n\nnewlines  ")
    for text in texts:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_model_loads_and_runs(tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    batch = tokenizer(["What is the capital of Veloria?"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_builder_is_deterministic(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "build_embedded.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    formats = [f"format-samples/{path.name}" for path in (EMBEDDED / "format-samples").glob("*.jsonl")]
    assert len(formats) == 5
    for rel in ("infinity-instruct-sample/train.jsonl", "tiny-qwen2/tokenizer.json", *formats):
        assert (tmp_path / rel).read_bytes() == (EMBEDDED / rel).read_bytes(), rel
