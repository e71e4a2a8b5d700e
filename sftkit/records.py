"""Canonical records, what every adapter produces, and the helpers every adapter needs to build them.

A record is one of:

- a conversation: ``{"messages": [Message, ...], "tools": [...]}`` (``tools`` optional: JSON-schema function
  definitions); an assistant message may hold ``tool_calls`` (each with the ``id`` the data gives it), its
  ``reasoning_content`` and a ``weight`` (0: not trained); a ``tool`` message answers one (``tool_call_id``).
  Any other field a turn has travels with it to the chat template, which may read it;
- ``{"prompt": str | [Message, ...], "completion": str | [Message, ...]}``;
- ``{"text": str}``.

The record types are the contract's (``sftkit.contract``). sftkit checks every record an adapter returns
(``sftkit.data.adapt.check_record``); the helpers raise a ``RowError`` with the right reason and the column or
turn it concerns, so an adapter needs no checks of its own for text, roles and tool calls.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from sftkit.contract import Detection, RowError

EMPTY_CONTENT = "empty content"
UNKNOWN_ROLE = "unknown role"
MALFORMED_TOOL_CALL = "malformed tool call"
INVALID_WEIGHT = "invalid weight"
# Where datasets keep an assistant's reasoning: Qwen3 and DeepSeek-R1 (and vLLM's API) call it reasoning_content,
# gpt-oss thinking, OpenAI's newer API reasoning. Records hold it as reasoning_content; the template gets every name.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
# Speaker names in wide use, in any case (Human, GPT, User, ASSISTANT), and the role each means.
WELL_KNOWN_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                    "gpt": "assistant", "tool": "tool", "observation": "tool"}




def text(value: Any, column: str, option: str | None = None) -> str:
    """``value`` as non-empty text; a RowError naming the column (and the option that names it) otherwise."""
    hint = f"; name another column with dataset_options {option}" if option else ""
    if value is not None and not isinstance(value, str):
        raise RowError(f"column {column!r} must be text, got {short(value)}{hint}")
    if not value or not value.strip():
        raise RowError(f"column {column!r} is empty{hint}", reason=EMPTY_CONTENT)
    return value


def short(value: Any) -> str:
    """A value for an error message, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_json(value: str, where: str, what: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise RowError(
            f"{where}: {what} is not valid JSON ({error.msg} at character {error.pos}): {short(value)}",
            reason=MALFORMED_TOOL_CALL,
        ) from None


def tool_call(call: Any, where: str) -> dict[str, Any]:
    """One tool call as ``{"type": "function", "function": {"name", "arguments": dict}}``.

    Accepts the OpenAI form (``{"id", "type", "function": {"name", "arguments": str | dict}}``) and the bare
    ``{"name", "arguments"}`` form of LLaMA-Factory / Glaive; ``arguments`` given as a JSON string is parsed. The
    call's ``id``, where the data has one, is kept.
    """
    if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
        function = call["function"]
    elif isinstance(call, Mapping):
        function = call
    else:
        raise RowError(
            f"{where}: a tool call must be an object with 'name' and 'arguments', got {short(call)}",
            reason=MALFORMED_TOOL_CALL,
        )
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise RowError(f"{where}: tool call has no function 'name': {short(call)}", reason=MALFORMED_TOOL_CALL)
    arguments = function.get("arguments", function.get("parameters"))
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        arguments = {}
    elif isinstance(arguments, str):
        arguments = load_json(arguments, where, f"the arguments of tool call {name!r}")
    if not isinstance(arguments, Mapping):
        raise RowError(
            f"{where}: the arguments of tool call {name!r} must be a JSON object, got {short(arguments)}",
            reason=MALFORMED_TOOL_CALL,
        )
    canonical: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": dict(arguments)}}
    if isinstance(call, Mapping) and call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise RowError(f"{where}: tool call {name!r} has a non-text id {short(call['id'])}",
                           reason=MALFORMED_TOOL_CALL)
        canonical["id"] = call["id"]
    return canonical


def tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """A list of tool calls (or one call, or a JSON string of either) in canonical form."""
    if isinstance(calls, str):
        calls = load_json(calls, where, "the tool call")
    if isinstance(calls, Mapping):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise RowError(
            f"{where}: tool calls must be a non-empty list of {{name, arguments}} objects, got {short(calls)}",
            reason=MALFORMED_TOOL_CALL,
        )
    return [tool_call(call, where) for call in calls]


def tool_definitions(value: Any, column: str) -> list[dict[str, Any]] | None:
    """Tool definitions in OpenAI form, or None when there are none (missing, null, "", "[]", [])."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        value = load_json(value, f"column {column!r}", "the tool list")
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise RowError(
            f"column {column!r} must be a list of function definitions (or a JSON string of one), got {short(value)}",
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
                f"(and 'description', 'parameters'), got {short(tool)}",
                reason=MALFORMED_TOOL_CALL,
            )
        tools.append({"type": "function", "function": dict(function)})
    return tools or None


def attach_tools(record: dict[str, Any], row: Mapping[str, Any], column: str | None) -> dict[str, Any]:
    """The record, with the row's function definitions when it has any."""
    if column and (tools := tool_definitions(row.get(column), column)):
        record["tools"] = tools
    return record


def name_tool_turns(messages: list[dict[str, Any]]) -> None:
    """Give each tool turn without a name the name of the call it answers: the call its ``tool_call_id`` names, else
    the next one unanswered (calls and results pair up in order)."""
    pending: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            pending = list(message["tool_calls"])
        elif message["role"] == "tool":
            answered = message.get("tool_call_id")
            call = next((call for call in pending if answered is not None and call.get("id") == answered),
                        pending[0] if pending else None)
            if call is not None:
                pending.remove(call)
                message.setdefault("name", call["function"]["name"])
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
                 rows: Sequence[Mapping[str, Any]], role_key: str, role_map: Mapping[str, str],
                 column_option: str = "messages_column") -> Detection | None:
    """Why a list-of-turns adapter fits: a column, whatever its name, holds turns that all have ``keys`` (the
    adapter's default column first); with ``column_option`` naming it, and the speakers matched by case, when any
    were."""
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
        return Detection(reason, {} if column == default_column else {column_option: column})
    return None


def check_role_map(role_map: Mapping[str, Any], allowed: Sequence[str], option: str = "role_map") -> None:
    """For ``Adapter.check``: every role a role map names is one of ``allowed``; ``option`` is the name the adapter
    gives the map among its ``dataset_options``, which the error names."""
    for speaker, role in role_map.items():
        if role not in allowed:
            raise ValueError(f"{option} maps {speaker!r} to {role!r}; roles are {'|'.join(allowed)}")


def weight(value: Any, where: str, role: str) -> int | None:
    """A turn's ``weight`` (OpenAI's fine-tuning format): 1 trains an assistant turn, 0 leaves it untrained; None when
    the turn has none. Anything else is a RowError, so a typo never trains a turn that was meant to be left out."""
    if value is None:
        return None
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        if value == 1 and role != "assistant":
            raise RowError(f"{where} ({role}) has weight 1, but only assistant turns are trained; drop its weight",
                           reason=INVALID_WEIGHT)
        return int(value)
    raise RowError(f"{where} has weight {short(value)}; a weight is 0 (the turn is not trained) or 1 (it is)",
                   reason=INVALID_WEIGHT)


def reasoning(turn: Mapping[str, Any], where: str) -> str | None:
    """The reasoning a turn carries under any of its usual names (``REASONING_KEYS``), or None."""
    found = {key: turn[key] for key in REASONING_KEYS if turn.get(key) is not None}
    for key, value in found.items():
        if not isinstance(value, str):
            raise RowError(f"{where}: {key} must be text (the reasoning before the reply), got {short(value)}")
    texts = {value for value in found.values() if value.strip()}
    if len(texts) > 1:
        raise RowError(f"{where} holds different reasoning under {' and '.join(found)}; keep one")
    return texts.pop() if texts else None


def turn_fields(turn: Mapping[str, Any], where: str, role: str, read: Collection[str]) -> dict[str, Any]:
    """Everything a turn carries besides what the adapter has ``read`` (its role, text, tool calls), as a message
    holds it: its weight, its reasoning as ``reasoning_content``, and every other field as it is, for the chat
    template to read (the id of the tool call a tool turn answers, a speaker's name, ...)."""
    fields: dict[str, Any] = {}
    for key, value in turn.items():
        if key in read or key in REASONING_KEYS or key == "weight" or value is None:
            continue
        if key in ("name", "tool_call_id") and not isinstance(value, str):
            raise RowError(f"{where}: {key} must be text, got {short(value)}")
        fields[key] = value
    if (text := reasoning(turn, where)) is not None:
        fields["reasoning_content"] = text
    if (trained := weight(turn.get("weight"), where, role)) is not None:
        fields["weight"] = trained
    return fields


def messages_from_turns(turns: Any, column: str, role_map: Mapping[str, str],
                        option: str = "role_map") -> list[dict[str, Any]]:
    """``{role, content[, tool_calls]}`` turns, with any other fields (``turn_fields``), to canonical messages; raises
    RowError naming the turn. ``option`` is the name of the adapter's ``dataset_options`` key that extends
    ``role_map``: an unknown speaker is the data's, and its error says to map it there."""
    if not isinstance(turns, list) or not turns:
        raise RowError(f"column {column!r} must be a non-empty list of {{role, content}} turns, got {short(turns)}")
    messages = []
    for position, turn in enumerate(turns):
        where = f"{column} turn {position}"
        if not isinstance(turn, Mapping) or "role" not in turn:
            raise RowError(f"{where} must be a mapping with keys 'role' and 'content', got {short(turn)}")
        speaker = turn["role"]
        role = role_of(speaker, role_map)
        if role is None:
            raise RowError(
                f"{where} has unknown role {speaker!r}; map it with "
                f"dataset_options: {{{option}: {{{speaker}: user|assistant|system|tool}}}}",
                reason=UNKNOWN_ROLE,
            )
        content = turn.get("content")
        calls = turn.get("tool_calls")
        if calls and role != "assistant":
            raise RowError(
                f"{where} ({speaker}) has tool_calls; only assistant turns may call tools",
                reason=MALFORMED_TOOL_CALL,
            )
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise RowError(f"{where} ({speaker}) must have text 'content', got {short(content)}")
        message: dict[str, Any] = {"role": role, "content": content,
                                   **turn_fields(turn, where, role, ("role", "content", "tool_calls"))}
        if calls:
            message["tool_calls"] = tool_calls(calls, where)
        messages.append(message)
    name_tool_turns(messages)
    return messages
