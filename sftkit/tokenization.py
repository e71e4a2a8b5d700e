"""Tokenize and mask: a canonical record becomes ``input_ids`` and ``labels`` (-100 where no loss is taken).

Loss masking is computed from character spans of the rendered text, so it needs no
``{% generation %}`` markers in the chat template: an assistant turn is everything the template
adds between the prompt for that turn (``add_generation_prompt=True``) and the turn's end-of-turn
token, inclusive. The end-of-turn token is therefore trained (the model learns to stop) and the
template's formatting around it is not.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase
from trl.chat_template_utils import get_training_chat_template

from sftkit.errors import SftkitError
from sftkit.hookspecs import RowError
from sftkit.model import end_of_turn_token_id

IGNORE = -100


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything about a run that changes the tokens and labels of a record."""

    max_length: int | None
    truncate: bool  # cut rows to max_length here (not when the packer does it)
    long_rows: str  # "truncate" or "skip"
    assistant_only_loss: bool
    completion_only_loss: bool | None
    end_of_turn: str | None  # the template's end-of-turn token text, e.g. "<|im_end|>"

    @classmethod
    def from_recipe(cls, recipe: Any, tokenizer: PreTrainedTokenizerBase) -> TokenizeSettings:
        args = recipe.training
        token_id = end_of_turn_token_id(tokenizer)
        return cls(
            max_length=args.max_length,
            truncate=args.max_length is not None and not args.packing,
            long_rows=recipe.sftkit.long_rows,
            assistant_only_loss=args.assistant_only_loss,
            completion_only_loss=args.completion_only_loss,
            end_of_turn=tokenizer.convert_ids_to_tokens(token_id) if token_id is not None else None,
        )


def tools_of(record: Mapping[str, Any]) -> list | None:
    tools = record.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], tools: list | None,
           generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tools=tools, tokenize=False, add_generation_prompt=generation_prompt
    )


def _through_end_of_turn(text: str, start: int, end: int, end_of_turn: str | None) -> int:
    """Where a trained span stops: right after the turn's end-of-turn token, when the template writes one."""
    if end_of_turn:
        found = text.rfind(end_of_turn, start, end)
        if found >= 0:
            return found + len(end_of_turn)
    return end


def _prefix(text: str, prefix: str, what: str) -> int:
    if not text.startswith(prefix):
        raise SftkitError(
            f"loss masking: the chat template does not render {what} as a prefix of the whole conversation "
            "(it rewrites earlier turns), so the trained part of each turn cannot be located, and TRL has no "
            "training version of this template. Set assistant_only_loss: false (and completion_only_loss: false) "
            "to train on every token, or set chat_template_path to a template that renders conversations "
            "incrementally."
        )
    return len(prefix)


def conversation_spans(
    messages: Sequence[Mapping[str, Any]], tools: list | None, tokenizer: PreTrainedTokenizerBase, end_of_turn: str | None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it."""
    text = render(tokenizer, messages, tools)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _prefix(text, render(tokenizer, messages[:index], tools, True), "the prompt") if index else 0
        end = _prefix(text, render(tokenizer, messages[: index + 1], tools), "a conversation's first turns")
        spans.append((start, _through_end_of_turn(text, start, end, end_of_turn)))
    return text, spans


# A conversation whose earlier turns a template may rewrite once later turns follow (Qwen3 drops their reasoning).
PROBE = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nR\n</think>\n\nA"},
         {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]


def rendering_tokenizer(tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedTokenizerBase, str | None]:
    """The tokenizer that renders training rows, and a note when it is not the model's own.

    A template that rewrites earlier turns once later ones follow hides what the data says (earlier
    reasoning is dropped) and leaves trained turns impossible to locate. Where TRL ships a training
    version of such a template (earlier turns kept as written), rows are rendered with it; the model
    keeps its own template for inference. Other templates stay as they are: a row they rewrite is a
    clear error naming the fix.
    """
    if not tokenizer.chat_template:
        return tokenizer, None
    try:
        conversation_spans(PROBE, None, tokenizer, None)
        return tokenizer, None
    except SftkitError:
        pass
    try:
        template = get_training_chat_template(tokenizer)
    except ValueError:  # TRL knows no training version of this template
        return tokenizer, None
    if template is None:
        return tokenizer, None
    rendering = copy.deepcopy(tokenizer)
    rendering.chat_template = template
    return rendering, ("chat template: the model's template drops parts of earlier turns (such as their reasoning) "
                       "once later turns follow; training rows are rendered with TRL's training version of it, "
                       "which keeps every turn as the data has it (the saved model keeps its own template)")


def _completion_spans(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                      end_of_turn: str | None) -> tuple[str, list[tuple[int, int]]]:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str):
        text = prompt + completion
        if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
            text += tokenizer.eos_token
        return text, [(len(prompt), len(text))]
    tools = tools_of(record)
    text = render(tokenizer, [*prompt, *completion], tools)
    start = _prefix(text, render(tokenizer, prompt, tools, True), "the prompt")
    return text, [(start, _through_end_of_turn(text, start, len(text), end_of_turn))]


def _text_with_spans(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                     settings: TokenizeSettings) -> tuple[str, list[tuple[int, int]] | None]:
    """The text to tokenize and the spans that carry loss (None: every token does)."""
    if "messages" in record:
        if not settings.assistant_only_loss:
            return render(tokenizer, record["messages"], tools_of(record)), None
        return conversation_spans(record["messages"], tools_of(record), tokenizer, settings.end_of_turn)
    if "prompt" in record:
        text, spans = _completion_spans(record, tokenizer, settings.end_of_turn)
        return text, (None if settings.completion_only_loss is False else spans)
    text = record["text"]
    if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return text, None


class TokenizedRowError(RowError):
    """A row that tokenized but cannot train; keeps its length for the length statistics."""

    def __init__(self, message: str, reason: str, length: int) -> None:
        super().__init__(message, reason)
        self.length = length


def _labelled(input_ids: list[int], offsets: list[tuple[int, int]] | None, spans: list[tuple[int, int]] | None,
              settings: TokenizeSettings) -> dict[str, Any]:
    """Labels from the trained character spans, then the max_length rule and the nothing-to-train check."""
    if spans is None:
        labels = list(input_ids)
    else:
        labels = [
            token if any(start <= offset[0] < end for start, end in spans) else IGNORE
            for token, offset in zip(input_ids, offsets, strict=True)
        ]
    length, limit = len(input_ids), settings.max_length
    if limit is not None and length > limit:
        if settings.long_rows == "skip":
            raise TokenizedRowError(f"{length} tokens, more than max_length {limit}", "too long", length)
        if settings.truncate:
            input_ids, labels = input_ids[:limit], labels[:limit]
    if all(label == IGNORE for label in labels[1:]):
        raise TokenizedRowError(
            f"no token carries loss within max_length {limit} (the prompt alone fills it, or there is nothing "
            "to train on)",
            "no trained tokens",
            length,
        )
    return {"input_ids": list(input_ids), "labels": labels, "length": length}


def tokenize_record(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                    settings: TokenizeSettings) -> dict[str, Any]:
    """``input_ids`` and ``labels`` for one record; RowError if it is too long to keep or trains nothing."""
    text, spans = _text_with_spans(record, tokenizer, settings)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=spans is not None)
    return _labelled(encoded["input_ids"], encoded.get("offset_mapping"), spans, settings)


def tokenize_records(records: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase,
                     settings: TokenizeSettings) -> list[dict[str, Any] | RowError]:
    """Many records with one batched tokenizer call (the fast path); a failing record gives its RowError."""
    prepared = [_text_with_spans(record, tokenizer, settings) for record in records]
    with_offsets = any(spans is not None for _, spans in prepared)
    encoded = tokenizer([text for text, _ in prepared], add_special_tokens=False,
                        return_offsets_mapping=with_offsets)
    results: list[dict[str, Any] | RowError] = []
    for position, (_, spans) in enumerate(prepared):
        offsets = encoded["offset_mapping"][position] if with_offsets else None
        try:
            results.append(_labelled(encoded["input_ids"][position], offsets, spans, settings))
        except RowError as error:
            results.append(error)
    return results


TOKENIZED = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),  # before truncation
        "invalid": datasets.Value("string"),
        "problem": datasets.Value("string"),
    }
)


def tokenize_split(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, settings: TokenizeSettings,
                   split: str, num_proc: int | None = None) -> datasets.Dataset:
    """Tokenize the ``record`` of every valid row in batches; rows that fail are marked ``invalid``, not raised.

    The records themselves are dropped: once tokenized, carrying their text on would write it twice.
    """

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [],
                                "invalid": list(batch["invalid"]), "problem": list(batch["problem"])}
        valid = [position for position, record in enumerate(batch["record"]) if record is not None]
        results = dict(zip(valid, tokenize_records([json.loads(batch["record"][p]) for p in valid], tokenizer,
                                                   settings), strict=True)) if valid else {}
        for position in range(len(batch["record"])):
            result = results.get(position)
            tokens = result if isinstance(result, dict) else {"input_ids": [], "labels": [], "length": 0}
            if isinstance(result, RowError):
                out["invalid"][position], out["problem"][position] = result.reason, str(result)
                tokens["length"] = getattr(result, "length", 0)
            for key in ("input_ids", "labels", "length"):
                out[key].append(tokens[key])
        return out

    kept = {name: feature for name, feature in dataset.features.items() if name != "record"}
    return dataset.map(tokenize, batched=True, features=datasets.Features({**kept, **TOKENIZED}),
                       remove_columns=["record"], num_proc=num_proc, desc=f"Tokenizing {split} rows")
