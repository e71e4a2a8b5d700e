"""Messages: a list of ``{"role", "content"}`` turns (OpenAI / TRL conversational), optionally with tools.

Also home of the helpers the other built-ins share for tool calls and tool definitions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sftkit.hookspecs import Adapter, Detection, Option, RowError, hookimpl

ROLES = ("system", "user", "assistant", "tool")
MALFORMED_TOOL_CALL = "malformed tool call"
# Speaker names in wide use, in any case (Human, GPT, User, ASSISTANT), and the role each means.
WELL_KNOWN_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                    "gpt": "assistant", "tool": "tool", "observation": "tool"}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _load_json(value: str, where: str, what: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise RowError(
            f"{where}: {what} is not valid JSON ({error.msg} at character {error.pos}): {_short(value)}",
            reason=MALFORMED_TOOL_CALL,
        ) from None


def normalize_tool_call(call: Any, where: str) -> dict[str, Any]:
    """One tool call as ``{"type": "function", "function": {"name", "arguments": dict}}``.

    Accepts the OpenAI form (``{"id", "type", "function": {"name", "arguments": str | dict}}``) and the bare
    ``{"name", "arguments"}`` form of LLaMA-Factory / Glaive; ``arguments`` given as a JSON string is parsed.
    """
    if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
        function = call["function"]
    elif isinstance(call, Mapping):
        function = call
    else:
        raise RowError(
            f"{where}: a tool call must be an object with 'name' and 'arguments', got {_short(call)}",
            reason=MALFORMED_TOOL_CALL,
        )
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise RowError(f"{where}: tool call has no function 'name': {_short(call)}", reason=MALFORMED_TOOL_CALL)
    arguments = function.get("arguments", function.get("parameters"))
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        arguments = {}
    elif isinstance(arguments, str):
        arguments = _load_json(arguments, where, f"the arguments of tool call {name!r}")
    if not isinstance(arguments, Mapping):
        raise RowError(
            f"{where}: the arguments of tool call {name!r} must be a JSON object, got {_short(arguments)}",
            reason=MALFORMED_TOOL_CALL,
        )
    return {"type": "function", "function": {"name": name, "arguments": dict(arguments)}}


def normalize_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """A list of tool calls (or one call, or a JSON string of either) in canonical form."""
    if isinstance(calls, str):
        calls = _load_json(calls, where, "the tool call")
    if isinstance(calls, Mapping):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise RowError(
            f"{where}: tool calls must be a non-empty list of {{name, arguments}} objects, got {_short(calls)}",
            reason=MALFORMED_TOOL_CALL,
        )
    return [normalize_tool_call(call, where) for call in calls]


def normalize_tools(value: Any, column: str) -> list[dict[str, Any]] | None:
    """Tool definitions in OpenAI form, or None when there are none (missing, null, "", "[]", [])."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        value = _load_json(value, f"column {column!r}", "the tool list")
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise RowError(
            f"column {column!r} must be a list of function definitions (or a JSON string of one), got {_short(value)}",
            reason=MALFORMED_TOOL_CALL,
        )
    tools = []
    for position, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping):
            function = tool
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RowError(
                f"column {column!r}: tool {position} must be a function definition with a 'name' "
                f"(and 'description', 'parameters'), got {_short(tool)}",
                reason=MALFORMED_TOOL_CALL,
            )
        tools.append({"type": "function", "function": dict(function)})
    return tools or None


def attach_tools(record: dict[str, Any], row: Mapping[str, Any], column: str | None) -> dict[str, Any]:
    """The record, with the row's function definitions when it has any."""
    if column and (tools := normalize_tools(row.get(column), column)):
        record["tools"] = tools
    return record


def name_tool_turns(messages: list[dict[str, Any]]) -> None:
    """Give each tool turn without a name the name of the call it answers (calls and results pair up in order)."""
    pending: list[str] = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            pending = [call["function"]["name"] for call in message["tool_calls"]]
        elif message["role"] == "tool":
            name = pending.pop(0) if pending else None
            if name is not None and "name" not in message:
                message["name"] = name
        else:
            pending = []


def role_of(speaker: Any, role_map: Mapping[str, str]) -> str | None:
    """The role a turn's speaker names: the role map's, else a well-known name in any case; None if unknown."""
    if not isinstance(speaker, str):
        return None
    if speaker in role_map:
        return role_map[speaker]
    lowered = speaker.lower()
    by_case = {key.lower(): role for key, role in role_map.items()}
    return by_case.get(lowered) or WELL_KNOWN_ROLES.get(lowered)


# Columns of turns that belong to other formats: prompt/completion pairs, preference pairs.
OTHER_FORMATS_COLUMNS = ("prompt", "completion", "chosen", "rejected")


def _holds_turns(values: list[Any], keys: tuple[str, ...]) -> bool:
    turns = [turn for value in values if isinstance(value, list) for turn in value]
    return bool(turns) and all(isinstance(value, list) for value in values if value is not None) and all(
        isinstance(turn, Mapping) and set(keys) <= turn.keys() for turn in turns)


def detect_turns(default_column: str, keys: tuple[str, ...], columns: Sequence[str],
                 rows: Sequence[Mapping[str, Any]], role_key: str, role_map: Mapping[str, str]) -> Detection | None:
    """Why a list-of-turns adapter fits: a column, whatever its name, holds turns that all have ``keys`` (the
    adapter's default column first); with the option naming it, and the speakers matched by case, when any were."""
    candidates = [column for column in columns if column not in OTHER_FORMATS_COLUMNS]
    for column in sorted(candidates, key=lambda name: name != default_column):
        values = [row.get(column) for row in rows]
        if not _holds_turns(values, keys):
            continue
        reason = f"column {column!r} holds {{{', '.join(keys)}}} turns"
        speakers = sorted({turn[role_key] for value in values for turn in value or []
                           if isinstance(turn[role_key], str) and turn[role_key] not in role_map})
        matched = [f"{speaker} -> {role_of(speaker, role_map)}" for speaker in speakers if role_of(speaker, role_map)]
        if matched:
            reason += f"; speakers read by their well-known names: {', '.join(matched)}"
        return Detection(reason, {} if column == default_column else {"messages_column": column})
    return None


def check_role_map(role_map: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for speaker, role in role_map.items():
        if role not in allowed:
            raise RowError(
                f"dataset_options role_map maps {speaker!r} to {role!r}; roles are {'|'.join(allowed)}",
                reason="unknown role",
            )


def convert_messages(turns: Any, column: str, role_map: Mapping[str, str]) -> list[dict[str, Any]]:
    """``{role, content[, tool_calls][, name]}`` turns to canonical messages; raises RowError naming the turn."""
    if not isinstance(turns, list) or not turns:
        raise RowError(f"column {column!r} must be a non-empty list of {{role, content}} turns, got {_short(turns)}")
    messages = []
    for position, turn in enumerate(turns):
        where = f"{column} turn {position}"
        if not isinstance(turn, Mapping) or "role" not in turn:
            raise RowError(f"{where} must be a mapping with keys 'role' and 'content', got {_short(turn)}")
        speaker = turn["role"]
        role = role_of(speaker, role_map)
        if role is None:
            raise RowError(
                f"{where} has unknown role {speaker!r}; map it with "
                f"dataset_options: {{role_map: {{{speaker}: user|assistant|system|tool}}}}",
                reason="unknown role",
            )
        content = turn.get("content")
        tool_calls = turn.get("tool_calls")
        if tool_calls and role != "assistant":
            raise RowError(
                f"{where} ({speaker}) has tool_calls; only assistant turns may call tools",
                reason=MALFORMED_TOOL_CALL,
            )
        if content is None and tool_calls:
            content = ""
        if not isinstance(content, str):
            raise RowError(f"{where} ({speaker}) must have text 'content', got {_short(content)}")
        message: dict[str, Any] = {"role": role, "content": content}
        if tool_calls:
            message["tool_calls"] = normalize_tool_calls(tool_calls, where)
        if role == "tool" and isinstance(turn.get("name"), str) and turn["name"]:
            message["name"] = turn["name"]
        messages.append(message)
    name_tool_turns(messages)
    return messages


class MessagesAdapter(Adapter):
    name = "messages"
    description = "OpenAI / TRL conversational: a list of {role, content} turns, tool_calls and tool turns kept."
    options = {
        "messages_column": Option("messages", "column holding the list of {role, content} turns"),
        "role_map": Option(
            {}, "extra role -> canonical role (system, user, assistant, tool), merged over the identity map"
        ),
        "tools_column": Option(
            "tools", "column with the function definitions (a list or a JSON string), read when present; null for none"
        ),
    }

    def detect(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Detection | None:
        return detect_turns("messages", ("role", "content"), columns, rows, "role", {role: role for role in ROLES})

    def columns(self, options: Mapping[str, Any]) -> list[str]:
        return [options["messages_column"], *([options["tools_column"]] if options["tools_column"] else [])]

    def convert(self, row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        check_role_map(options["role_map"], ROLES)
        role_map = {**{role: role for role in ROLES}, **options["role_map"]}
        column = options["messages_column"]
        if column not in row:
            raise RowError(f"the row has no column {column!r}; name the right one with dataset_options messages_column")
        return attach_tools({"messages": convert_messages(row[column], column, role_map)}, row, options["tools_column"])


@hookimpl
def register_adapters(register) -> None:
    register(MessagesAdapter())
