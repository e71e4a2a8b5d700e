"""One row chain on every path: eager, lazy and a packed run's share prepare the same tokens and labels for every
row id, and find the same rows invalid for the same reasons; sftkit check shows what they train."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from chat_templates import MISTRAL, ZEPHYR, family_tokenizer
from helpers import TINY_MODEL, sharegpt_row, write_jsonl, write_recipe

from sftkit.data.bad_rows import INVALID_KEY
from sftkit.data.preparation import prepare_data
from sftkit.jobs.check import check, mark_trained
from sftkit.setup.resolve import load_recipe
from sftkit.train.model import load_tokenizer

TOOLS = json.dumps([{"name": "get_weather", "description": "The weather in a city",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])


def tool_row(index: int) -> dict:
    turns = [("human", f"Weather in city {index}?"),
             ("function_call", json.dumps({"name": "get_weather", "arguments": {"city": f"c{index}"}})),
             ("observation", json.dumps({"degrees": index})), ("gpt", f"It is {index} degrees in city {index}.")]
    if index % 3 == 0:
        turns.insert(0, ("system", "Answer with the tool's result."))
    return {**sharegpt_row(index, *turns), "tools": TOOLS}


def conversation_rows(count: int) -> list[dict]:
    rows = [tool_row(index) if index % 2 else
            sharegpt_row(index, ("human", f"What is {index} + 1?"), ("gpt", f"{index} + 1 = {index + 1}."))
            for index in range(count)]
    rows[7] = sharegpt_row(7, ("human", "hi"), ("robot", "beep"))  # unknown role
    rows[11] = sharegpt_row(11, ("human", "hi"), ("gpt", "   "))  # empty content
    return rows


def plain_rows(count: int) -> list[dict]:
    """Conversations without tools (for templates that render no tool turns), a few of them invalid."""
    rows = [sharegpt_row(index, ("human", f"What is {index} + 1?"), ("gpt", f"{index} + 1 = {index + 1}."))
            for index in range(count)]
    rows[7] = sharegpt_row(7, ("human", "hi"), ("robot", "beep"))
    rows[9] = sharegpt_row(9, ("system", "Be brief."), ("human", "hi"), ("gpt", "Hello."))  # a system turn
    return rows


def prompt_completion_rows(count: int) -> list[dict]:
    return [{"prompt": f"Capital of region {index}? Answer: ", "completion": f"City {index}."} for index in range(count)]


def text_rows(count: int) -> list[dict]:
    return [{"text": f"Amberhold is the capital of region {index}." * (1 + index % 4)} for index in range(count)]


def alpaca_rows(count: int) -> list[dict]:
    return [{"instruction": f"Name region {index}.", "input": "", "output": f"Region {index}."} for index in range(count)]


def bos_tokenizer_dir(root: Path) -> str:
    """A tokenizer that puts its BOS before plain text, as Llama's does (only a tokenizer: no weights are needed)."""
    folder = root / "bos-tokenizer"
    family_tokenizer("llama3").save_pretrained(folder)
    return str(folder)


def template_dir(root: Path) -> str:
    """A tokenizer directory whose template (and special tokens) a recipe borrows with chat_template_path."""
    folder = root / "zephyr-template"
    tokenizer = family_tokenizer("zephyr")
    tokenizer.chat_template = ZEPHYR
    tokenizer.save_pretrained(folder)
    return str(folder)


def strict_template(root: Path) -> str:
    """Mistral's template: roles must alternate, and a system turn is rejected."""
    path = root / "mistral.jinja"
    path.write_text(MISTRAL)
    return str(path)


RECIPES = {
    "conversations with tools, replies trained": lambda root: {
        "dataset_name": str(write_jsonl(root / "conversations.jsonl", conversation_rows(60))),
        "assistant_only_loss": True, "on_invalid": "skip", "max_invalid_fraction": 0.5},
    "conversations, every token trained": lambda root: {
        "dataset_name": str(write_jsonl(root / "conversations.jsonl", conversation_rows(60))),
        "on_invalid": "skip", "max_invalid_fraction": 0.5},
    "prompt and completion": lambda root: {
        "dataset_name": str(write_jsonl(root / "pc.jsonl", prompt_completion_rows(60)))},
    "text with a BOS tokenizer": lambda root: {
        "dataset_name": str(write_jsonl(root / "text.jsonl", text_rows(60))), "model_name_or_path": bos_tokenizer_dir(root),
        "max_length": 40},
    "a mixture": lambda root: {
        "datasets": [{"path": str(write_jsonl(root / "conversations.jsonl", conversation_rows(40)))},
                     {"path": str(write_jsonl(root / "alpaca.jsonl", alpaca_rows(30))), "dataset_format": "alpaca"}],
        "assistant_only_loss": True, "on_invalid": "skip", "max_invalid_fraction": 0.5},
    "a template from a tokenizer directory": lambda root: {
        "dataset_name": str(write_jsonl(root / "plain.jsonl", plain_rows(60))),
        "chat_template_path": template_dir(root), "assistant_only_loss": True, "on_invalid": "skip",
        "max_invalid_fraction": 0.5},
    "eos_token": lambda root: {
        "dataset_name": str(write_jsonl(root / "text.jsonl", text_rows(60))), "eos_token": "<|im_end|>"},
    "a template that rejects rows": lambda root: {
        "dataset_name": str(write_jsonl(root / "plain.jsonl", plain_rows(60))),
        "chat_template_path": strict_template(root), "assistant_only_loss": True, "on_invalid": "skip",
        "max_invalid_fraction": 0.5},
}


def prepared(root: Path, name: str, **path_keys):
    values = {"model_name_or_path": TINY_MODEL, "output_dir": str(root / "out"), "report_to": "none",
              "max_length": 256, "test_split_size": 0, **RECIPES[name](root), **path_keys}
    recipe = load_recipe(str(write_recipe(root / f"{name}.yaml", **values)))
    return recipe, prepare_data(recipe, load_tokenizer(recipe))


def by_row(data) -> dict[int, tuple]:
    """Every prepared train row by its id: (input_ids, labels) or the reason it is invalid."""
    if data.train.on_demand is not None:
        ids = data.train.on_demand.data.column("row").to_pylist()
        out = {}
        for position, row in enumerate(ids):
            item = data.train.on_demand[position]
            invalid = item[INVALID_KEY]
            out[row] = invalid["reason"] if invalid else (list(item["input_ids"]), list(item["labels"]))
        return out
    rows = data.train.rows
    return {row: reason if reason else (list(ids), list(labels))
            for row, ids, labels, reason in zip(rows["row"], rows["input_ids"], rows["labels"], rows["invalid"],
                                                strict=True)}


@pytest.mark.parametrize("name", RECIPES)
def test_eager_lazy_and_packed_preparation_train_the_same_rows(tmp_path, name):
    eager_recipe, eager = prepared(tmp_path, name, prepare="eager")
    _, lazy = prepared(tmp_path, name, prepare="lazy", max_steps=2)
    _, share = prepared(tmp_path, name, packing=True, max_steps=2, per_device_train_batch_size=2)
    assert share.preparation.startswith("packed share")
    eager_rows, lazy_rows, share_rows = by_row(eager), by_row(lazy), by_row(share)
    assert lazy_rows == eager_rows  # every row id, tokens, labels, and the reason of each invalid row
    assert share_rows and all(share_rows[row] == eager_rows[row] for row in share_rows)
    reasons = {reason for reason in eager_rows.values() if isinstance(reason, str)}
    if "rows" in name or "conversations" in name or "mixture" in name or "template" in name:
        assert reasons  # the comparison covered invalid rows too
    if name == "a template that rejects rows":
        assert "rejected by chat template" in reasons
    tokenizer = load_tokenizer(eager_recipe)
    valid = [tokens for tokens in eager_rows.values() if not isinstance(tokens, str)]
    if name == "eos_token":  # the recipe's end of text, on every path
        assert all(input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") for input_ids, _ in valid)
    if name == "a template from a tokenizer directory":  # rendered with the template the recipe names
        assert all(tokenizer.decode(input_ids).startswith(("<|user|>\n", "<|system|>\n")) for input_ids, _ in valid)


def test_check_shows_what_the_paths_train(tmp_path):
    recipe, eager = prepared(tmp_path, "conversations with tools, replies trained", prepare="eager")
    tokenizer = load_tokenizer(recipe)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(Exception):
        check(recipe, 3, colour=False)
    rows = by_row(eager)
    shown = printed.getvalue().split("\n--- ")[1:]
    assert len(shown) == 3
    for block in shown:
        row = int(re.match(r".*? row (\d+): ", block)[1])  # "SOURCE row N: ..."
        input_ids, labels = rows[row]
        assert mark_trained(input_ids, labels, tokenizer, colour=False) in block
        assert "the prompt is token for token what inference sends" in block


@pytest.mark.slow
def test_the_saved_model_keeps_the_template_its_rows_were_rendered_with(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT
    from transformers import AutoTokenizer

    folder = template_dir(tmp_path)
    data = write_jsonl(tmp_path / "plain.jsonl", plain_rows(40))
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "sftkit", "--config", str(ROOT / "configs/recipes/quickstart.yaml"), "--dataset_name",
         str(data), "--output_dir", str(output), "--chat_template_path", folder, "--max_steps", "2",
         "--test_split_size", "0", "--eval_strategy", "no", "--eval_on_start", "false", "--on_invalid", "skip",
         "--max_invalid_fraction", "0.5"], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = AutoTokenizer.from_pretrained(output)
    assert saved.chat_template == ZEPHYR
    record = {"messages": [{"role": "user", "content": "What is 2 + 1?"}, {"role": "assistant", "content": "3."}]}
    recipe = load_recipe(str(write_recipe(tmp_path / "r.yaml", model_name_or_path=TINY_MODEL, dataset_name=str(data),
                                          output_dir=str(output), chat_template_path=folder)))
    trained = load_tokenizer(recipe)
    assert trained.apply_chat_template(record["messages"], tokenize=True, return_dict=False) == \
        saved.apply_chat_template(record["messages"], tokenize=True, return_dict=False)
