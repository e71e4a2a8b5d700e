"""Validate: render a sample with the chat template and stop before training if turns vanish.

A chat template renders only the roles it knows. TRL 1.16 with Qwen2.5's template turns every
``human``/``gpt`` row into the default system prompt alone and trains on that without a word.
This guard renders what will train and compares it with what the data says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from sftkit.contract import RowError
from sftkit.data.templates import render, tools_of
from sftkit.data.tokenization import TokenizeSettings, training_messages
from sftkit.errors import SftkitError

REASONING = re.compile(r"<think>.*?</think>", re.DOTALL)
WHITESPACE = re.compile(r"\s+")
SHOWN_PROBLEMS = 3


@dataclass
class Problem:
    row: int
    what: str


def _normalise(text: str) -> str:
    """Templates may trim, re-indent or drop earlier reasoning: compare without any of that."""
    return WHITESPACE.sub("", REASONING.sub("", text))


def _expected_pieces(message: Mapping[str, Any]) -> list[str]:
    """What of a turn must appear in the rendering: its text, and the name of each tool it calls."""
    pieces = [message["content"]] if isinstance(message.get("content"), str) else []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        pieces.append(function.get("name", ""))
    return [piece for piece in (_normalise(piece) for piece in pieces) if piece]


def missing_turns(messages: Sequence[Mapping[str, Any]], rendered: str) -> list[str]:
    """Turns whose content does not appear, in order, in the rendered text."""
    haystack = _normalise(rendered)
    position, missing = 0, []
    for index, message in enumerate(messages):
        for piece in _expected_pieces(message):
            found = haystack.find(piece, position)
            if found < 0:
                missing.append(f"turn {index} ({message['role']}): {message.get('content')!r:.60}")
                break
            position = found + len(piece)
    return missing


def sample_indices(num_rows: int, count: int) -> list[int]:
    """Evenly spread rows, so a bad region anywhere in the data has a chance to be seen."""
    if num_rows <= count:
        return list(range(num_rows))
    if count <= 0:  # render_check_rows: 0
        return []
    step = num_rows / count
    return sorted({int(i * step) for i in range(count)})


def check_rendering(records: Sequence[tuple[int, Mapping[str, Any]]], tokenizer: PreTrainedTokenizerBase,
                    settings: TokenizeSettings, split: str) -> int:
    """Render the sampled ``(row, record)`` conversations as training renders them; raise if a turn is missing from
    the rendering. Returns how many were rendered (rows the template rejects are the bad-row policy's)."""
    problems: list[Problem] = []
    renderings: dict[int, str] = {}
    for row, record in records:
        conversation = record.get("messages") or [
            *(record["prompt"] if isinstance(record.get("prompt"), list) else []),
            *(record["completion"] if isinstance(record.get("completion"), list) else []),
        ]
        if not conversation:
            continue  # plain text and string prompts are tokenized as they are, not rendered
        if not tokenizer.chat_template:
            raise SftkitError(
                "the data is conversational but the tokenizer has no chat template; set chat_template_path in the "
                "recipe to a .jinja file, a tokenizer directory or a Hub model id that has one"
            )
        try:
            renderings[row] = render(tokenizer, training_messages(conversation, settings, tokenizer.eos_token),
                                     tools_of(record))
        except RowError:
            continue
        problems += [Problem(row, f"{turn} is missing from the rendering")
                     for turn in missing_turns(conversation, renderings[row])]
    if problems:
        shown = "\n".join(f"  {split} row {problem.row}: {problem.what}" for problem in problems[:SHOWN_PROBLEMS])
        first = problems[0].row
        raise SftkitError(
            f"render guard: {len({problem.row for problem in problems})} of {len(renderings)} sampled {split} "
            f"examples lose turns in the chat template:\n{shown}\n"
            f"The chat template renders {split} row {first} as:\n{renderings[first][:800]}\n"
            "A template drops turns whose role it does not know: map the data's roles with dataset_options "
            "(for example role_map) or use a chat template that renders every role."
        )
    return len(renderings)
