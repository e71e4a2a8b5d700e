"""Validate early: render a sample with the chat template and stop before any row is prepared if turns vanish.

A chat template renders only the roles it knows. TRL 1.16 with Qwen2.5's template turns every
``human``/``gpt`` row into the default system prompt alone and trains on that without a word.
Every row is checked the same way as it is prepared (``sftkit.data.tokenization``); this guard
looks at a sample first, so that a template that loses turns everywhere stops the run at once,
with the rendering to look at, instead of as thousands of invalid rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from sftkit.contract import ROLES, RowError, is_conversation
from sftkit.data.rendered import appearance
from sftkit.data.templates import render, tools_of
from sftkit.data.tokenization import TokenizeSettings, training_messages
from sftkit.errors import SftkitError

SHOWN_PROBLEMS = 3


@dataclass
class Problem:
    row: str  # the row's name: its source and its place there
    turn: int
    role: str
    content: Any


def _hint(problems: list[Problem]) -> str:
    """What to do: map roles a template cannot know, or use a template that renders the roles it drops."""
    unknown = sorted({problem.role for problem in problems if problem.role not in ROLES})
    if unknown:
        return (f"A template drops turns whose role it does not know ({', '.join(unknown)}): map the data's roles with "
                "dataset_options (for example role_map) or use a chat template that renders every role.")
    dropped = sorted({problem.role for problem in problems})
    return (f"The chat template does not render these {'/'.join(dropped)} turns as the data has them (a role or a "
            "form, such as tool calls, it leaves out): set chat_template_path to a template that renders them.")


def sample_indices(num_rows: int, count: int) -> list[int]:
    """Evenly spread rows, so a bad region anywhere in the data has a chance to be seen."""
    if num_rows <= count:
        return list(range(num_rows))
    if count <= 0:  # render_check_rows: 0
        return []
    step = num_rows / count
    return sorted({int(i * step) for i in range(count)})


def check_rendering(records: Sequence[tuple[str, Mapping[str, Any]]], tokenizer: PreTrainedTokenizerBase,
                    settings: TokenizeSettings, split: str) -> int:
    """Render the sampled ``(row's name, record)`` conversations as training renders them; raise if a turn is missing
    from the rendering. Returns how many were rendered (rows the template rejects are the bad-row policy's)."""
    problems: list[Problem] = []
    renderings: dict[str, str] = {}
    for row, record in records:
        if not is_conversation(record):
            continue  # plain text and string prompts are tokenized as they are, not rendered
        conversation = record.get("messages") or [*record["prompt"], *record["completion"]]
        if not tokenizer.chat_template:
            raise SftkitError(
                "the data is conversational but the tokenizer has no chat template; set chat_template_path in the "
                "recipe to a .jinja file, a tokenizer directory or a Hub model id that has one"
            )
        messages = training_messages(conversation, settings, tokenizer.eos_token)
        try:
            renderings[row] = render(tokenizer, messages, tools_of(record))
        except RowError:
            continue
        problems += [Problem(row, turn, conversation[turn]["role"], conversation[turn].get("content"))
                     for turn in appearance(messages, renderings[row]).missing]
    if problems:
        shown = "\n".join(f"  {problem.row}: turn {problem.turn} ({problem.role}): {problem.content!r:.60} "
                          "is missing from the rendering" for problem in problems[:SHOWN_PROBLEMS])
        first = problems[0].row
        raise SftkitError(
            f"render guard: {len({problem.row for problem in problems})} of {len(renderings)} sampled {split} "
            f"examples lose turns in the chat template:\n{shown}\n"
            f"The chat template renders {first} as:\n{renderings[first][:800]}\n{_hint(problems)}"
        )
    return len(renderings)
