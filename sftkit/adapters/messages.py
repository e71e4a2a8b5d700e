"""Messages: a list of ``{"role", "content"}`` turns (OpenAI / TRL conversational), optionally with tools."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sftkit import (
    ROLES,
    Adapter,
    Columns,
    Detection,
    Option,
    Record,
    attach_tools,
    check_role_map,
    detect_turns,
    hookimpl,
    messages_from_turns,
)

IDENTITY = {role: role for role in ROLES}


@dataclass(frozen=True)
class MessagesOptions:
    messages_column: str = Option("messages", "column holding the list of {role, content} turns")
    role_map: Mapping[str, str] = Option({}, "extra role -> canonical role (system, user, assistant, tool), merged over "
                                          "the identity map")
    tools_column: str | None = Option("tools", "column with the function definitions (a list or a JSON string), read "
                                               "when present; null for none")


class MessagesAdapter(Adapter):
    name = "messages"
    description = "OpenAI / TRL conversational: a list of {role, content} turns, tool_calls and tool turns kept."
    Options = MessagesOptions

    def detect(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Detection | None:
        return detect_turns("messages", ("role", "content"), columns, rows, "role", IDENTITY)

    def columns(self, options: MessagesOptions) -> Columns:
        return Columns(required=(options.messages_column,),
                       optional=(options.tools_column,) if options.tools_column else ())

    def check(self, options: MessagesOptions) -> None:
        check_role_map(options.role_map, ROLES)

    def convert(self, row: Mapping[str, Any], options: MessagesOptions) -> Record:
        column = options.messages_column
        messages = messages_from_turns(row[column], column, {**IDENTITY, **options.role_map})
        return attach_tools({"messages": messages}, row, options.tools_column)


@hookimpl
def register_adapters(register) -> None:
    register(MessagesAdapter())
