"""ShareGPT: ``conversations`` of ``{"from": ..., "value": ...}`` turns, as in BAAI/Infinity-Instruct."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sftkit.hookspecs import Adapter, Option, RowError, hookimpl

DEFAULT_ROLE_MAP = {"human": "user", "gpt": "assistant", "system": "system"}


class ShareGPTAdapter(Adapter):
    name = "sharegpt"
    description = "ShareGPT / Infinity-Instruct: a list of {from, value} turns (human -> user, gpt -> assistant)."
    options = {
        "messages_column": Option("conversations", "column holding the list of turns"),
        "role_key": Option("from", "key of a turn that names its speaker"),
        "content_key": Option("value", "key of a turn that holds its text"),
        "role_map": Option(
            DEFAULT_ROLE_MAP,
            "speaker -> role (system, user, assistant, tool); merged over the default "
            "{human: user, gpt: assistant, system: system}",
        ),
    }

    def detect(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str | None:
        if "conversations" not in columns:
            return None
        turns = [turn for row in rows for turn in (row.get("conversations") or [])]
        if turns and all(isinstance(turn, Mapping) and {"from", "value"} <= turn.keys() for turn in turns):
            return "column 'conversations' holds {from, value} turns"
        return None

    def columns(self, options: Mapping[str, Any]) -> list[str]:
        return [options["messages_column"]]

    def convert(self, row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        column, role_key, content_key = options["messages_column"], options["role_key"], options["content_key"]
        role_map = {**DEFAULT_ROLE_MAP, **options["role_map"]}
        turns = row[column]
        if not isinstance(turns, list) or not turns:
            raise RowError(f"column {column!r} must be a non-empty list of turns, got {turns!r:.80}")
        messages = []
        for position, turn in enumerate(turns):
            if not isinstance(turn, Mapping) or role_key not in turn or content_key not in turn:
                raise RowError(
                    f"turn {position} must be a mapping with keys {role_key!r} and {content_key!r}, got {turn!r:.80}"
                )
            speaker = turn[role_key]
            if speaker not in role_map:
                raise RowError(
                    f"turn {position} has unknown role {speaker!r}; map it with "
                    f"dataset_options: {{role_map: {{{speaker}: user|assistant|system|tool}}}}"
                )
            content = turn[content_key]
            if not isinstance(content, str):
                raise RowError(f"turn {position} ({speaker}) has non-text content {content!r:.80}")
            messages.append({"role": role_map[speaker], "content": content})
        return {"messages": messages}


@hookimpl
def register_adapters(register) -> None:
    register(ShareGPTAdapter())
