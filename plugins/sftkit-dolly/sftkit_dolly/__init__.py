"""sftkit adapter for Databricks Dolly: ``instruction``, ``context``, ``response`` (and ``category``) columns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sftkit.hookspecs import Adapter, Option, RowError, hookimpl


class DollyAdapter(Adapter):
    name = "dolly"
    description = "Databricks Dolly: instruction (+ context) -> user turn, response -> assistant turn."
    options = {
        "context_position": Option(
            "after", "where a non-empty context goes: after or before the instruction", choices=("after", "before")
        ),
        "system_prompt": Option(None, "text of a system turn to put first; null for none"),
    }

    def detect(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str | None:
        if {"instruction", "context", "response"} <= set(columns):
            return "columns instruction, context and response"
        return None

    def columns(self, options: Mapping[str, Any]) -> list[str]:
        return ["instruction", "context", "response"]

    def convert(self, row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        instruction, context, response = row["instruction"], row["context"] or "", row["response"]
        for column, text in (("instruction", instruction), ("response", response)):
            if not isinstance(text, str) or not text.strip():
                raise RowError(f"column {column!r} must be non-empty text, got {text!r:.80}", reason="empty content")
        if not isinstance(context, str):
            raise RowError(f"column 'context' must be text or null, got {context!r:.80}")

        parts = [instruction, context] if options["context_position"] == "after" else [context, instruction]
        system = options["system_prompt"]
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": "\n\n".join(part for part in parts if part)})
        messages.append({"role": "assistant", "content": response})
        return {"messages": messages}


@hookimpl
def register_adapters(register) -> None:
    register(DollyAdapter())
