"""Alpaca: ``instruction`` (+ ``input``) -> user turn, ``output`` -> assistant turn, as LLaMA-Factory reads it.

Optional ``system`` (a system prompt) and ``history`` (earlier ``[user, assistant]`` pairs) columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sftkit import Adapter, Columns, Option, Record, RowError, hookimpl, short, text


@dataclass(frozen=True)
class AlpacaOptions:
    instruction_column: str = Option("instruction", "column with the instruction (the user turn)")
    input_column: str | None = Option("input", "column with optional input appended to the instruction; null for none")
    output_column: str = Option("output", "column with the answer (the assistant turn)")
    system_column: str | None = Option("system", "column with a system prompt, read when present; null for none")
    history_column: str | None = Option("history", "column with earlier [user, assistant] pairs, read when present; "
                                                   "null for none")


class AlpacaAdapter(Adapter):
    name = "alpaca"
    description = (
        'Alpaca / LLaMA-Factory: instruction + "\\n" + input -> user turn, output -> assistant turn; '
        "optional system and history ([user, assistant] pairs) columns."
    )
    Options = AlpacaOptions

    def detect(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str | None:
        if {"instruction", "output"} <= set(columns):
            return "columns instruction and output"
        return None

    def columns(self, options: AlpacaOptions) -> Columns:
        optional = (options.input_column, options.system_column, options.history_column)
        return Columns(required=(options.instruction_column, options.output_column),
                       optional=tuple(column for column in optional if column))

    def convert(self, row: Mapping[str, Any], options: AlpacaOptions) -> Record:
        instruction = text(row[options.instruction_column], options.instruction_column, "instruction_column")
        output = text(row[options.output_column], options.output_column, "output_column")
        extra = {}
        for key, column in (("input", options.input_column), ("system", options.system_column)):
            value = row.get(column) if column else None
            if value is not None and not isinstance(value, str):
                raise RowError(f"column {column!r} must be text or null, got {short(value)}")
            extra[key] = value or ""
        messages: list[dict[str, Any]] = []
        if extra["system"]:
            messages.append({"role": "system", "content": extra["system"]})
        messages.extend(_history(row.get(options.history_column) if options.history_column else None,
                                 options.history_column))
        user = f"{instruction}\n{extra['input']}" if extra["input"] else instruction
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return {"messages": messages}


def _history(history: Any, column: str | None) -> list[dict[str, Any]]:
    if history is None:
        return []
    if not isinstance(history, list):
        raise RowError(f"column {column!r} must be a list of [user, assistant] pairs, got {short(history)}")
    messages = []
    for position, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(part, str) for part in pair):
            raise RowError(f"{column} entry {position} must be a [user, assistant] pair of texts, got {short(pair)}")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


@hookimpl
def register_adapters(register) -> None:
    register(AlpacaAdapter())
