"""Whether a chat template's rendering shows what the data says: each turn's text, the tools it calls, its reasoning.

A template shows a turn in its own way: trimmed or re-indented, or JSON-escaped (templates that render a tool
result with ``tojson``). So a piece of a turn is looked for, whitespace ignored, as it is and in its escaped
forms. A template that drops the reasoning of earlier turns writes it nowhere, so reasoning kept inside a turn's
text (``<think>...</think>``) is not looked for with the text: it is the reasoning's own check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
WHITESPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The text without whitespace: templates trim, re-indent and put turns on lines of their own."""
    return WHITESPACE.sub("", text)


def _forms(piece: str) -> list[str]:
    """A piece as templates may write it: as it is, or escaped as a JSON string (``tojson``, with or without
    escaping non-ASCII characters)."""
    forms = [piece, json.dumps(piece, ensure_ascii=False)[1:-1], json.dumps(piece)[1:-1]]
    return list(dict.fromkeys(normalise(form) for form in forms))


def find(haystack: str, piece: str, start: int = 0) -> tuple[int, int] | None:
    """Where the earliest form of ``piece`` is in the normalised ``haystack`` at or after ``start`` (start, end), or
    None."""
    found = [(index, len(form)) for form in _forms(piece) if (index := haystack.find(form, start)) >= 0]
    if not found:
        return None
    index, length = min(found)
    return index, index + length


def text_pieces(message: Mapping[str, Any]) -> list[str]:
    """What of a turn must appear in a rendering: its text without reasoning kept inside it, and the name of each
    tool it calls."""
    content = message.get("content")
    pieces = [THINK.sub("", content)] if isinstance(content, str) else []
    pieces += [call.get("function", call).get("name", "") for call in message.get("tool_calls") or []]
    return [piece for piece in pieces if normalise(piece)]


def reasoning_of(message: Mapping[str, Any]) -> str | None:
    """The reasoning an assistant turn carries: its ``reasoning_content``, or the ``<think>`` block of its text."""
    if message.get("reasoning_content"):
        return message["reasoning_content"]
    match = THINK.search(message.get("content") or "")
    return match.group(1) if match and match.group(1).strip() else None


def shows(rendered: str, message: Mapping[str, Any]) -> bool:
    """Whether ``rendered`` (a turn's own part of a rendering) shows the turn's text and tool calls, in order."""
    return _place(normalise(rendered), message, 0) is not None


def shows_reasoning(rendered: str, message: Mapping[str, Any]) -> bool:
    """Whether ``rendered`` (a turn's own part of a rendering) shows the turn's reasoning (True without any)."""
    reasoning = reasoning_of(message)
    return reasoning is None or find(normalise(rendered), reasoning) is not None


def _place(haystack: str, message: Mapping[str, Any], start: int) -> tuple[int, int] | None:
    """Where a turn's pieces are, in order, from ``start``: (where its first begins, where its last ends), or None."""
    first, position = None, start
    for piece in text_pieces(message):
        found = find(haystack, piece, position)
        if found is None:
            return None
        first, position = found[0] if first is None else first, found[1]
    return (position, position) if first is None else (first, position)


@dataclass(frozen=True)
class Appearance:
    """How a whole conversation appears in its rendering: the turns missing from it, and those whose reasoning it
    does not show (looked for between the turn before and the turn after, where a template writes it)."""

    missing: list[int]
    reasoning_hidden: list[int]


def appearance(messages: Sequence[Mapping[str, Any]], rendered: str) -> Appearance:
    """Each turn is looked for after the one before it, except a system turn, which templates may move (Mistral's
    into the last user turn, Llama 2's into the first): it is looked for anywhere."""
    haystack, position, places = normalise(rendered), 0, []
    for message in messages:
        moves = message["role"] == "system"
        place = _place(haystack, message, 0 if moves else position)
        places.append(place)
        if place is not None and not moves:
            position = place[1]
    missing = [index for index, place in enumerate(places) if place is None]
    hidden = []
    for index, message in enumerate(messages):
        reasoning = reasoning_of(message)
        if reasoning is None or places[index] is None:
            continue
        before = next((place[1] for place, other in zip(reversed(places[:index]), reversed(messages[:index]),
                                                         strict=True) if place is not None and other["role"] != "system"), 0)
        after = next((place[0] for place, other in zip(places[index + 1:], messages[index + 1:], strict=True)
                      if place is not None and other["role"] != "system"), len(haystack))
        if find(haystack[before:after], reasoning) is None:
            hidden.append(index)
    return Appearance(missing, hidden)
