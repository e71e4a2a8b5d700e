"""Plain text: one ``text`` column, trained on whole (pre-training style, e.g. C4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sftkit.adapters.messages import _short
from sftkit.hookspecs import Adapter, Option, RowError, hookimpl

# Columns another built-in reads: a text column beside one of them is that format's, not plain text.
CLAIMED_BY_OTHERS = ("messages", "conversations", "prompt", "instruction")


class TextAdapter(Adapter):
    name = "text"
    description = "Plain text: a text column, trained on whole (no turns, no loss masking)."
    options = {"text_column": Option("text", "column holding the text")}

    def detect(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str | None:
        if "text" in columns and not set(CLAIMED_BY_OTHERS) & set(columns):
            return "a text column and no conversation, prompt or instruction columns"
        return None

    def columns(self, options: Mapping[str, Any]) -> list[str]:
        return [options["text_column"]]

    def convert(self, row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        column = options["text_column"]
        if column not in row:
            raise RowError(f"the row has no column {column!r}; name the right one with dataset_options text_column")
        text = row[column]
        if not isinstance(text, str):
            raise RowError(f"column {column!r} must be text, got {_short(text)}")
        if not text.strip():
            raise RowError(f"column {column!r} is empty", reason="empty content")
        return {"text": text}


@hookimpl
def register_adapters(register) -> None:
    register(TextAdapter())
