"""ShareGPT: ``conversations`` of ``{"from": ..., "value": ...}`` turns, as in BAAI/Infinity-Instruct.

Also LLaMA-Factory's sharegpt format: the column and key names are options (its ``tags``), a ``system`` column
holds the system prompt, a ``tools`` column the function definitions, and the speakers ``function_call`` and
``observation`` are the assistant's tool calls (JSON ``{"name", "arguments"}``, or a list of them) and their results.
A turn's ``weight`` (0: not trained), its reasoning and any other field it has travel with it (``sftkit.turn_fields``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sftkit import (
    ROLES,
    UNKNOWN_ROLE,
    Adapter,
    Columns,
    Detection,
    Option,
    Record,
    RowError,
    attach_tools,
    check_role_map,
    detect_turns,
    hookimpl,
    name_tool_turns,
    role_of,
    short,
    tool_calls,
    turn_fields,
)

FUNCTION_CALL = "function_call"  # the special role: an assistant turn whose value is the JSON of its tool calls
DEFAULT_ROLE_MAP = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "function_call": FUNCTION_CALL,
    "observation": "tool",
}
TARGETS = (*ROLES, FUNCTION_CALL)


@dataclass(frozen=True)
class ShareGPTOptions:
    messages_column: str = Option("conversations", "column holding the list of turns")
    role_key: str = Option("from", "key of a turn that names its speaker")
    content_key: str = Option("value", "key of a turn that holds its text")
    role_map: Mapping[str, str] = Option(DEFAULT_ROLE_MAP, "speaker -> role (system, user, assistant, tool, or "
                                      "function_call for a turn whose value is the JSON of tool calls); merged over "
                                      "this default")
    system_column: str | None = Option("system", "column with a system prompt, read when present; null for none")
    tools_column: str | None = Option("tools", "column with the function definitions (a list or a JSON string), read "
                                               "when present; null for none")


class ShareGPTAdapter(Adapter):
    name = "sharegpt"
    description = (
        "ShareGPT / Infinity-Instruct / LLaMA-Factory: a list of {from, value} turns (human -> user, gpt -> assistant, "
        "function_call -> assistant tool calls, observation -> tool), optional system and tools columns."
    )
    Options = ShareGPTOptions

    def detect(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Detection | None:
        return detect_turns("conversations", ("from", "value"), columns, rows, "from", DEFAULT_ROLE_MAP)

    def columns(self, options: ShareGPTOptions) -> Columns:
        optional = tuple(column for column in (options.system_column, options.tools_column) if column)
        return Columns(required=(options.messages_column,), optional=optional)

    def check(self, options: ShareGPTOptions) -> None:
        check_role_map(options.role_map, TARGETS)

    def convert(self, row: Mapping[str, Any], options: ShareGPTOptions) -> Record:
        column, role_key, content_key = options.messages_column, options.role_key, options.content_key
        role_map = {**DEFAULT_ROLE_MAP, **options.role_map}
        turns = row[column]
        if not isinstance(turns, list) or not turns:
            raise RowError(f"column {column!r} must be a non-empty list of turns, got {short(turns)}")
        messages: list[dict[str, Any]] = []
        system_column = options.system_column
        system = row.get(system_column) if system_column else None
        if system is not None and not isinstance(system, str):
            raise RowError(f"column {system_column!r} must be text (the system prompt), got {short(system)}")
        if system:
            messages.append({"role": "system", "content": system})
        calling: dict[str, Any] | None = None  # the assistant turn that the last function_call turn became
        for position, turn in enumerate(turns):
            if not isinstance(turn, Mapping) or role_key not in turn or content_key not in turn:
                raise RowError(
                    f"turn {position} must be a mapping with keys {role_key!r} and {content_key!r}, got {short(turn)}"
                )
            speaker = turn[role_key]
            role = role_of(speaker, role_map)
            if role is None:
                raise RowError(
                    f"turn {position} has unknown role {speaker!r}; map it with "
                    f"dataset_options: {{role_map: {{{speaker}: user|assistant|system|tool|function_call}}}}",
                    reason=UNKNOWN_ROLE,
                )
            content = turn[content_key]
            fields = turn_fields(turn, f"turn {position}", "assistant" if role == FUNCTION_CALL else role,
                                 (role_key, content_key))
            if role == FUNCTION_CALL:
                calls = tool_calls(content, f"turn {position} ({speaker})")
                if calling is not None:  # consecutive function_call turns: one assistant turn calling several tools
                    calling["tool_calls"].extend(calls)
                else:
                    calling = {"role": "assistant", "content": "", **fields, "tool_calls": calls}
                    messages.append(calling)
                continue
            calling = None
            if not isinstance(content, str):
                raise RowError(f"turn {position} ({speaker}) has non-text content {short(content)}")
            if role == "system" and system and position == 0:
                raise RowError(
                    f"the row has both a system column {system_column!r} and a system turn 0; "
                    "keep one (set dataset_options system_column: null to ignore the column)"
                )
            messages.append({"role": role, "content": content, **fields})
        name_tool_turns(messages)
        return attach_tools({"messages": messages}, row, options.tools_column)


@hookimpl
def register_adapters(register) -> None:
    register(ShareGPTAdapter())
