"""Plain text: one ``text`` column, trained on whole (pre-training style, e.g. C4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sftkit import Adapter, Columns, Option, Record, hookimpl, text

# Columns another built-in reads: a text column beside one of them is that format's, not plain text.
CLAIMED_BY_OTHERS = ("messages", "conversations", "prompt", "instruction")


@dataclass(frozen=True)
class TextOptions:
    text_column: str = Option("text", "column holding the text")


class TextAdapter(Adapter):
    name = "text"
    description = "Plain text: a text column, trained on whole (no turns, no loss masking)."
    Options = TextOptions

    def detect(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str | None:
        if "text" in columns and not set(CLAIMED_BY_OTHERS) & set(columns):
            return "a text column and no conversation, prompt or instruction columns"
        return None

    def columns(self, options: TextOptions) -> Columns:
        return Columns(required=(options.text_column,))

    def convert(self, row: Mapping[str, Any], options: TextOptions) -> Record:
        return {"text": text(row[options.text_column], options.text_column, "text_column")}


@hookimpl
def register_adapters(register) -> None:
    register(TextAdapter())
