"""Alpaca: ``instruction`` (+ ``input``) -> user turn, ``output`` -> assistant turn, as LLaMA-Factory reads it.

Optional ``system`` (a system prompt) and ``history`` (earlier ``[user, assistant]`` pairs) columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sftkit.adapters.messages import _short
from sftkit.hookspecs import Adapter, Option, RowError, hookimpl


class AlpacaAdapter(Adapter):
    name = "alpaca"
    description = (
        'Alpaca / LLaMA-Factory: instruction + "\\n" + input -> user turn, output -> assistant turn; '
        "optional system and history ([user, assistant] pairs) columns."
    )
    options = {
        "instruction_column": Option("instruction", "column with the instruction (the user turn)"),
        "input_column": Option("input", "column with optional input appended to the instruction; null for none"),
        "output_column": Option("output", "column with the answer (the assistant turn)"),
        "system_column": Option("system", "column with a system prompt, read when present; null for none"),
        "history_column": Option(
            "history", "column with earlier [user, assistant] pairs, read when present; null for none"
        ),
    }

    def detect(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str | None:
        if {"instruction", "output"} <= set(columns):
            return "columns instruction and output"
        return None

    def columns(self, options: Mapping[str, Any]) -> list[str]:
        optional = [options[key] for key in ("input_column", "system_column", "history_column") if options[key]]
        return [options["instruction_column"], options["output_column"], *optional]

    def convert(self, row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        texts = {}
        for key in ("instruction_column", "output_column"):
            column = options[key]
            if column not in row:
                raise RowError(f"the row has no column {column!r}; name the right one with dataset_options {key}")
            text = row[column]
            if text is not None and not isinstance(text, str):
                raise RowError(f"column {column!r} must be text, got {_short(text)}")
            if not text or not text.strip():
                raise RowError(
                    f"column {column!r} is empty; drop the row or name another column with dataset_options {key}",
                    reason="empty content",
                )
            texts[key] = text
        extra = {}
        for key in ("input_column", "system_column"):
            column = options[key]
            value = row.get(column) if column else None
            if value is not None and not isinstance(value, str):
                raise RowError(f"column {column!r} must be text or null, got {_short(value)}")
            extra[key] = value or ""

        messages: list[dict[str, Any]] = []
        if extra["system_column"]:
            messages.append({"role": "system", "content": extra["system_column"]})
        messages.extend(self._history(row, options["history_column"]))
        user = texts["instruction_column"]
        if extra["input_column"]:
            user = f"{user}\n{extra['input_column']}"
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": texts["output_column"]})
        return {"messages": messages}

    @staticmethod
    def _history(row: Mapping[str, Any], column: str | None) -> list[dict[str, Any]]:
        history = row.get(column) if column else None
        if history is None:
            return []
        if not isinstance(history, list):
            raise RowError(f"column {column!r} must be a list of [user, assistant] pairs, got {_short(history)}")
        messages = []
        for position, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(text, str) for text in pair):
                raise RowError(
                    f"{column} entry {position} must be a [user, assistant] pair of texts, got {_short(pair)}"
                )
            messages.append({"role": "user", "content": pair[0]})
            messages.append({"role": "assistant", "content": pair[1]})
        return messages


@hookimpl
def register_adapters(register) -> None:
    register(AlpacaAdapter())
