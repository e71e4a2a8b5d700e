"""Validate: render a sample with the chat template and stop before training if turns vanish or nothing trains.

A chat template renders only the roles it knows. TRL 1.16 with Qwen2.5's template turns every
``human``/``gpt`` row into the default system prompt alone and trains on that without a word.
This guard renders what will train and compares it with what the data says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

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


def _tools(record: Mapping[str, Any]) -> list | None:
    tools = record.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools


def training_template(tokenizer: PreTrainedTokenizerBase, args: Any) -> str | None:
    """The template TRL will train with: with assistant_only_loss, one that marks assistant tokens."""
    if not args.assistant_only_loss or has_generation_markers(tokenizer.chat_template):
        return None
    try:
        return get_training_chat_template(tokenizer)
    except ValueError as error:
        raise SftkitError(
            "assistant_only_loss: true needs a chat template with {% generation %} markers, and TRL has no training "
            f"version of this tokenizer's template ({error}). Set assistant_only_loss: false, or chat_template_path "
            "to a template with generation markers."
        ) from None


def trained_token_count(
    record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, args: Any, template: str | None = None
) -> int:
    """How many tokens of this record carry loss once tokenised and cut to max_length, as TRL builds labels."""
    limit = args.max_length if args.max_length is not None and not args.packing else None
    if "messages" in record:
        encoded = tokenizer.apply_chat_template(
            record["messages"],
            tools=_tools(record),
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=bool(args.assistant_only_loss),
        )
        mask = encoded["assistant_masks"] if args.assistant_only_loss else [1] * len(encoded["input_ids"])
        return sum(mask[:limit])
    if "prompt" in record:
        prompt = tokenizer(record["prompt"])["input_ids"]
        full = tokenizer(record["prompt"] + record["completion"])["input_ids"]
        if args.completion_only_loss is False:
            return len(full[:limit])
        return max(0, len(full[:limit]) - len(prompt))
    return len(tokenizer(record["text"])["input_ids"][:limit])


def sample_indices(num_rows: int, count: int) -> list[int]:
    """Evenly spread rows, so a bad region anywhere in the data has a chance to be seen."""
    if num_rows <= count:
        return list(range(num_rows))
    step = num_rows / count
    return sorted({int(i * step) for i in range(count)})


def check_rendering(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, args: Any, rows: int, split: str
) -> int:
    """Render ``rows`` examples; raise if a turn is missing or an example trains on nothing. Returns rows checked."""
    is_chat = "messages" in dataset.column_names
    if is_chat and not tokenizer.chat_template:
        raise SftkitError(
            "the data is conversational but the tokenizer has no chat template; set chat_template_path in the recipe "
            "to a .jinja file or a tokenizer directory that has one"
        )
    template = training_template(tokenizer, args) if is_chat else None
    problems: list[Problem] = []
    indices = sample_indices(dataset.num_rows, rows)
    for index in indices:
        record = dataset[index]
        if is_chat:
            rendered = tokenizer.apply_chat_template(
                record["messages"], tools=_tools(record), chat_template=template, tokenize=False
            )
            problems += [Problem(index, f"{turn} is missing from the rendering") for turn in missing_turns(
                record["messages"], rendered
            )]
        if trained_token_count(record, tokenizer, args, template) == 0:
            problems.append(Problem(index, "no token of this example would be trained (check max_length, "
                                           "assistant_only_loss and that the example has an assistant turn)"))
    if problems:
        shown = "\n".join(f"  {split} row {problem.row}: {problem.what}" for problem in problems[:SHOWN_PROBLEMS])
        rows_hit = len({problem.row for problem in problems})
        example = dataset[problems[0].row]
        rendering = (
            tokenizer.apply_chat_template(example["messages"], tools=_tools(example), chat_template=template, tokenize=False)
            if is_chat else ""
        )
        raise SftkitError(
            f"render guard: {rows_hit} of {len(indices)} sampled {split} examples would not train as the data says:\n"
            f"{shown}\n"
            + (f"The chat template renders {split} row {problems[0].row} as:\n{rendering[:800]}\n" if rendering else "")
            + "A template drops turns whose role it does not know: map the data's roles with dataset_options "
            "(for example role_map) or use a chat template that renders every role."
        )
    return len(indices)
