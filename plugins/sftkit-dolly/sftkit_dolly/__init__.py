"""sftkit adapter for Databricks Dolly: ``instruction``, ``context``, ``response`` (and ``category``) columns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sftkit


@dataclass(frozen=True)
class DollyOptions:
    context_position: Literal["after", "before"] = sftkit.Option(
        "after", "where a non-empty context goes: after or before the instruction")
    system_prompt: str | None = sftkit.Option(None, "text of a system turn to put first; null for none")


class DollyAdapter(sftkit.Adapter):
    name = "dolly"
    description = "Databricks Dolly: instruction (+ context) -> user turn, response -> assistant turn."
    contract = "1.0"
    Options = DollyOptions

    def detect(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str | None:
        if {"instruction", "context", "response"} <= set(columns):
            return "columns instruction, context and response"
        return None

    def columns(self, options: DollyOptions) -> sftkit.Columns:
        return sftkit.Columns(required=("instruction", "response"), optional=("context",))

    def check(self, options: DollyOptions) -> None:
        if options.system_prompt is not None and not options.system_prompt.strip():
            raise ValueError("system_prompt is empty; give it text, or null for no system turn")

    def convert(self, row: Mapping[str, Any], options: DollyOptions) -> sftkit.Conversation:
        instruction = sftkit.text(row["instruction"], "instruction")
        response = sftkit.text(row["response"], "response")
        context = row["context"] or ""  # a missing context column, or a null context, is no context
        if not isinstance(context, str):
            raise sftkit.RowError(f"column 'context' must be text or null, got {sftkit.short(context)}")
        parts = [instruction, context] if options.context_position == "after" else [context, instruction]
        messages: list[sftkit.Message] = []
        if options.system_prompt is not None:
            messages.append({"role": "system", "content": options.system_prompt})
        messages.append({"role": "user", "content": "\n\n".join(part for part in parts if part)})
        messages.append({"role": "assistant", "content": response})
        return {"messages": messages}


@sftkit.hookimpl
def register_adapters(register) -> None:
    register(DollyAdapter())
