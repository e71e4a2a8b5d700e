"""The Dolly adapter, tested the way sftkit runs it: through ``sftkit.testing``, no model needed."""

from __future__ import annotations

import pytest
from sftkit_dolly import DollyAdapter, register_adapters

import sftkit
from sftkit.errors import SftkitError
from sftkit.testing import convert_rows, detects


@pytest.fixture
def rows() -> list[dict]:
    """Two rows as they appear in databricks/databricks-dolly-15k: one with a context, one without."""
    return [
        {
            "instruction": "When was the bridge opened?",
            "context": "The Veloria bridge opened in 1931.",
            "response": "In 1931.",
            "category": "closed_qa",
        },
        {"instruction": "Name a primary colour.", "context": "", "response": "Red.", "category": "open_qa"},
    ]


def test_converts_to_user_and_assistant_turns(rows: list[dict]) -> None:
    assert convert_rows(DollyAdapter(), rows) == [
        {
            "messages": [
                {"role": "user", "content": "When was the bridge opened?\n\nThe Veloria bridge opened in 1931."},
                {"role": "assistant", "content": "In 1931."},
            ]
        },
        {"messages": [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red."}]},
    ]


def test_context_before_and_system_prompt(rows: list[dict]) -> None:
    options = {"context_position": "before", "system_prompt": "Answer briefly."}
    first, second = convert_rows(DollyAdapter(), rows, options)
    assert first["messages"][:2] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "The Veloria bridge opened in 1931.\n\nWhen was the bridge opened?"},
    ]
    assert second["messages"][1] == {"role": "user", "content": "Name a primary colour."}


def test_a_null_or_missing_context_is_no_context(rows: list[dict]) -> None:
    null, missing = convert_rows(DollyAdapter(), [{**rows[1], "context": None},
                                                  {"instruction": "Name a primary colour.", "response": "Red."}])
    assert null == missing and null["messages"][0]["content"] == "Name a primary colour."


def test_detects_dolly_columns_only(rows: list[dict]) -> None:
    assert detects(DollyAdapter(), rows) is not None
    assert detects(DollyAdapter(), [{"instruction": "Hi", "input": "", "output": "Hello"}]) is None
    assert detects(DollyAdapter(), [{"instruction": "Hi", "response": "Hello"}]) is None


@pytest.mark.parametrize("column", ["instruction", "response"])
def test_empty_instruction_or_response_is_a_row_error(rows: list[dict], column: str) -> None:
    with pytest.raises(sftkit.RowError, match=f"column '{column}' is empty") as error:
        convert_rows(DollyAdapter(), [{**rows[0], column: "  "}])
    assert error.value.reason == "empty content"


def test_unknown_option_a_bad_position_and_an_empty_system_prompt_are_errors(rows: list[dict]) -> None:
    with pytest.raises(SftkitError, match="no option 'context_place'"):
        convert_rows(DollyAdapter(), rows, {"context_place": "before"})
    with pytest.raises(SftkitError, match="context_position of adapter 'dolly' must be one of 'after', 'before'"):
        convert_rows(DollyAdapter(), rows, {"context_position": "middle"})
    with pytest.raises(SftkitError, match="system_prompt is empty"):
        convert_rows(DollyAdapter(), rows, {"system_prompt": " "})


def test_registers_one_adapter_named_dolly_for_this_contract() -> None:
    registered = []
    register_adapters(register=registered.append)
    assert [adapter.name for adapter in registered] == ["dolly"]
    assert registered[0].contract == sftkit.CONTRACT
