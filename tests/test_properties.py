"""Bad input never crashes the program: random and malformed rows through every built-in adapter and the whole row
chain become a trainable row or a classified row error; random recipe files, in any bytes, become a recipe or a clear
error, read alone and through the command."""

from __future__ import annotations

import os

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftkit.adapters.alpaca import AlpacaAdapter
from sftkit.adapters.messages import MessagesAdapter
from sftkit.adapters.prompt_completion import PromptCompletionAdapter
from sftkit.adapters.sharegpt import ShareGPTAdapter
from sftkit.adapters.text import TextAdapter
from sftkit.cli import main
from sftkit.contract import RowError
from sftkit.data.adapt import resolve_options
from sftkit.data.rows import RowChain
from sftkit.data.templates import reply_end
from sftkit.data.tokenization import TokenizeSettings
from sftkit.errors import SftkitError
from sftkit.recipe import read_recipe

ADAPTERS = [AlpacaAdapter(), MessagesAdapter(), PromptCompletionAdapter(), ShareGPTAdapter(), TextAdapter()]
REASONS = {"rejected by adapter", "empty content", "unknown role", "malformed tool call", "no assistant turn",
           "does not end on a trained turn", "rejected by chat template", "no trained tokens", "too long"}
KEYS = ["role", "content", "from", "value", "tool_calls", "function", "name", "arguments", "type"]

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4), max_leaves=12)
turn = st.fixed_dictionaries({}, optional={key: values | st.sampled_from(
    ["user", "assistant", "system", "tool", "human", "gpt", "function_call", "observation", "robot", ""])
    for key in KEYS})
turns = st.lists(turn | values, max_size=5)


# Text that templates and tokenizers find hard: special tokens, template syntax, blank and unusual characters.
words = st.text(max_size=30) | st.sampled_from(["<|im_end|>", "<|im_start|>user", "<|endoftext|>", "{{ x }}", "{%",
                                                 " ", "\n", "", "<think>a</think>b", "\u200b", "🙂"])
roles = st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "observation", "function_call"])
plausible = {
    "messages": st.lists(st.fixed_dictionaries({"role": roles, "content": words}), min_size=1, max_size=5),
    "conversations": st.lists(st.fixed_dictionaries({"from": roles, "value": words}), min_size=1, max_size=5),
}


def row_for(adapter) -> st.SearchStrategy:
    """Rows with the adapter's own columns: well-formed turns and text with odd content, or values of any shape;
    and a stray column."""
    columns = adapter.columns(resolve_options(adapter, {}))
    value = {column: plausible.get(column, words) | turns | values for column in columns.all}
    return st.fixed_dictionaries({column: value[column] for column in columns.required},
                                 optional={**{column: value[column] for column in columns.optional}, "stray": values})


def chain(adapter, tokenizer) -> RowChain:
    end_of_turn, appended, _ = reply_end(tokenizer)
    return RowChain(adapter, resolve_options(adapter, {}), tokenizer, TokenizeSettings(
        max_length=64, truncate=True, truncation_mode="keep_start", long_rows="truncate", assistant_only_loss=True,
        completion_only_loss=None, end_of_turn=end_of_turn, eos_after_replies=appended))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.data())
def test_every_row_trains_or_is_a_classified_row_error(tokenizer, data):
    adapter = data.draw(st.sampled_from(ADAPTERS))
    row = data.draw(row_for(adapter))
    (result,) = chain(adapter, tokenizer)([row])
    if isinstance(result, RowError):
        assert result.reason in REASONS and str(result)
    else:
        assert len(result["input_ids"]) == len(result["labels"]) > 0


recipe_values = st.dictionaries(
    st.sampled_from(["model_name_or_path", "dataset_name", "learning_rate", "max_steps", "packing", "max_length",
                     "per_device_train_batch_size", "global_batch_size", "dataset_options", "datasets", "env",
                     "lr_scheduler_type", "bf16", "seed", "resume_from_checkpoint", "no_such_key", "test_split_size"])
    | st.text(max_size=10), values, max_size=8)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=recipe_values | values | st.text(max_size=80))
def test_any_recipe_file_is_read_or_refused_with_a_clear_error(tmp_path, content):
    path = tmp_path / "recipe.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    try:
        read_recipe(str(path))
    except SftkitError as error:
        assert str(error).startswith(f"recipe {path}")


# Bytes no UTF-8 text holds: a stray continuation byte, a cut sequence, an encoded surrogate, Latin-1's é, a BOM.
NOT_UTF8 = [b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xe9t\xe9", b"\xff\xfe", b"\xfe\xff", b"\xf8\x88\x80\x80\x80"]
recipe_texts = (recipe_values.map(lambda values: yaml.safe_dump(values, allow_unicode=True))
                | values.map(yaml.safe_dump) | st.text(max_size=80)).map(str.encode)


@st.composite
def recipe_bytes(draw: st.DrawFn) -> bytes:
    """What a recipe file may hold: YAML, text, random bytes, UTF-16; often with a byte that is not UTF-8."""
    content = draw(recipe_texts | st.binary(max_size=120)
                   | recipe_texts.map(lambda text: "\ufeff".encode("utf-16-le") + text.decode().encode("utf-16-le")))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(content)))
        content = content[:at] + draw(st.sampled_from(NOT_UTF8)) + content[at:]
    return content


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=recipe_bytes())
def test_any_recipe_file_given_to_the_command_is_checked_or_refused_without_a_traceback(tmp_path, capsys, monkeypatch,
                                                                                         content):
    monkeypatch.setattr("sftkit.jobs.check.check", lambda *arguments: None)  # the recipe is on trial here, not the rows
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    environment = dict(os.environ)  # the command sets the recipe's env:, example after example
    try:
        status = main(["check", "--config", str(path)])
    finally:
        os.environ.clear()
        os.environ.update(environment)
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert status == 0 or (status == 1 and error.startswith("sftkit: error: ")), error
