"""Tokenize and mask: a canonical record becomes ``input_ids`` and ``labels`` (-100 where no loss is taken).

Loss masking is computed from character spans of the rendered text, so it needs no
``{% generation %}`` markers in the chat template: an assistant turn is everything the template
adds between the prompt for that turn (``add_generation_prompt=True``) and the turn's end-of-turn
token, inclusive. The end-of-turn token is therefore trained (the model learns to stop) and the
template's formatting around it is not. A token is trained when its characters overlap a trained
span, so a completion's first word keeps its loss even when the prompt ends in the space before it.

Text and string prompt/completion rows are tokenized as TRL tokenizes them, with the tokenizer's
special tokens (the BOS of Llama, Mistral and Gemma tokenizers); rendered conversations without,
since their template writes its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from sftkit.contract import RowError
from sftkit.data.templates import prefix_length, render, reply_end, tools_of

IGNORE = -100
TOKENIZER_FAILED = "tokenizer error"
SPLITTING_STRATEGIES = ("bfd_split", "wrapped")  # packing strategies that keep a long row's overflow


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything about a run that changes the tokens and labels of a record."""

    max_length: int | None
    truncate: bool  # cut long rows to max_length here (not when the packer keeps their overflow)
    truncation_mode: str  # "keep_start" or "keep_end"
    long_rows: str  # "truncate" or "skip"
    assistant_only_loss: bool
    completion_only_loss: bool | None
    end_of_turn: str | None  # the token text that ends an assistant reply, e.g. "<|im_end|>"
    eos_after_replies: bool  # the template marks no end of a reply: the EOS is appended to each, and trained

    @classmethod
    def from_recipe(cls, recipe: Any, tokenizer: PreTrainedTokenizerBase) -> TokenizeSettings:
        args = recipe.training
        end_of_turn, eos_after_replies, _ = reply_end(tokenizer)
        return cls(
            max_length=args.max_length,
            truncate=args.max_length is not None and not (args.packing
                                                          and args.packing_strategy in SPLITTING_STRATEGIES),
            truncation_mode=args.truncation_mode,
            long_rows=recipe.sftkit.long_rows,
            assistant_only_loss=args.assistant_only_loss,
            completion_only_loss=args.completion_only_loss,
            end_of_turn=end_of_turn,
            eos_after_replies=eos_after_replies,
        )


def training_messages(messages: Sequence[Mapping[str, Any]], settings: TokenizeSettings,
                      eos_token: str | None) -> list[Mapping[str, Any]]:
    """The conversation as it is rendered for training: with the EOS after each reply where the template writes
    no end of turn of its own."""
    if not settings.eos_after_replies:
        return list(messages)
    return [{**message, "content": (message.get("content") or "") + eos_token} if message["role"] == "assistant"
            else message for message in messages]


def _through_end_of_turn(text: str, start: int, end: int, end_of_turn: str | None) -> int:
    """Where a trained span stops: right after the turn's end-of-turn token, when the template writes one."""
    if end_of_turn:
        found = text.find(end_of_turn, start, end)
        if found >= 0:
            return found + len(end_of_turn)
    return end


def _common_prefix(text: str, other: str) -> int:
    length = 0
    for a, b in zip(text, other, strict=False):
        if a != b:
            break
        length += 1
    return length


def conversation_spans(
    messages: Sequence[Mapping[str, Any]], tools: list | None, tokenizer: PreTrainedTokenizerBase, end_of_turn: str | None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it.

    A turn starts where its prompt (the conversation before it, with the generation prompt) ends, and ends at its
    end-of-turn token. A conversation that starts with an assistant turn starts after what the template puts
    before any turn (a default system prompt, a header), which is not trained.
    """
    text = render(tokenizer, messages, tools)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if index:
            start = prefix_length(text, render(tokenizer, messages[:index], tools, generation_prompt=True),
                                  "the prompt")
        else:  # no prompt to render: the reply starts where its content does, after the template's own opening
            marked = [{**message, "content": "\x00"}, *messages[1:]]
            start = _common_prefix(text, render(tokenizer, marked, tools))
        # Where this turn's own rendering and the whole conversation part ways: the next turn, or a closing the
        # template writes only at the very end of a conversation (Phi-3's EOS). The turn's end-of-turn token must
        # come before that; if not, the template rewrote this turn once later turns followed.
        own = render(tokenizer, messages[: index + 1], tools)
        end = max(start, _common_prefix(text, own))
        if end < len(own) and not (end_of_turn and text.find(end_of_turn, start, end) >= 0):
            prefix_length(text, own, "a conversation's first turns")  # raises: the turn was rewritten
        spans.append((start, _through_end_of_turn(text, start, end, end_of_turn)))
    return text, spans


def _completion_spans(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                      settings: TokenizeSettings) -> tuple[str, list[tuple[int, int]]]:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str):
        text = prompt + completion
        if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
            text += tokenizer.eos_token
        return text, [(len(prompt), len(text))]
    tools = tools_of(record)
    completion = training_messages(completion, settings, tokenizer.eos_token)
    text = render(tokenizer, [*prompt, *completion], tools)
    start = prefix_length(text, render(tokenizer, prompt, tools, generation_prompt=True), "the prompt")
    return text, [(start, _through_end_of_turn(text, start, len(text), settings.end_of_turn))]


def text_with_spans(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                    settings: TokenizeSettings) -> tuple[str, list[tuple[int, int]] | None, bool]:
    """The text to tokenize, the spans that are trained (None: every token is), and whether it is a rendered
    conversation (tokenized without the tokenizer's own special tokens, which the template already wrote)."""
    if "messages" in record:
        messages = training_messages(record["messages"], settings, tokenizer.eos_token)
        if not settings.assistant_only_loss:
            return render(tokenizer, messages, tools_of(record)), None, True
        text, spans = conversation_spans(messages, tools_of(record), tokenizer, settings.end_of_turn)
        return text, spans, True
    if "prompt" in record:
        text, spans = _completion_spans(record, tokenizer, settings)
        return text, (None if settings.completion_only_loss is False else spans), not isinstance(record["prompt"], str)
    text = record["text"]
    if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return text, None, False


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
    else:  # trained when its characters overlap a span (a token's offsets are [start, end) in the text)
        labels = [
            token if any(offset[0] < end and offset[1] > start for start, end in spans) else IGNORE
            for token, offset in zip(input_ids, offsets, strict=True)
        ]
    length, limit = len(input_ids), settings.max_length
    if limit is not None and length > limit:
        if settings.long_rows == "skip":
            raise TokenizedRowError(f"{length} tokens, more than max_length {limit}", "too long", length)
        if settings.truncate:
            kept = slice(-limit, None) if settings.truncation_mode == "keep_end" else slice(None, limit)
            input_ids, labels = input_ids[kept], labels[kept]
    if all(label == IGNORE for label in labels[1:]):
        raise TokenizedRowError(
            f"no token carries loss within max_length {limit} (the prompt alone fills it, or there is nothing "
            "to train on)",
            "no trained tokens",
            length,
        )
    return {"input_ids": list(input_ids), "labels": labels, "length": length}


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], special_tokens: bool,
            offsets: bool) -> list[dict[str, Any] | RowError]:
    """One batched tokenizer call; if the tokenizer fails on the batch, each text alone, so the failure is one row's."""
    try:
        encoded = tokenizer(texts, add_special_tokens=special_tokens, return_offsets_mapping=offsets)
        return [{key: encoded[key][position] for key in encoded} for position in range(len(texts))]
    except Exception:  # noqa: BLE001 - the tokenizer is not sftkit's code: find the row it fails on
        results: list[dict[str, Any] | RowError] = []
        for text in texts:
            try:
                results.append(dict(tokenizer(text, add_special_tokens=special_tokens,
                                              return_offsets_mapping=offsets)))
            except Exception as error:  # noqa: BLE001
                results.append(RowError(f"the tokenizer failed on this row: {type(error).__name__}: {error}",
                                        reason=TOKENIZER_FAILED))
        return results


def tokenize_records(records: Sequence[Mapping[str, Any] | RowError], tokenizer: PreTrainedTokenizerBase,
                     settings: TokenizeSettings) -> list[dict[str, Any] | RowError]:
    """Many records with one batched tokenizer call per kind (the fast path); a record that cannot train, or was
    already an error, gives its RowError."""
    results: list[dict[str, Any] | RowError] = list(records)
    prepared: dict[int, tuple[str, list[tuple[int, int]] | None, bool]] = {}
    for position, record in enumerate(records):
        if isinstance(record, RowError):
            continue
        try:
            prepared[position] = text_with_spans(record, tokenizer, settings)
        except RowError as error:
            results[position] = error
    for rendered in (True, False):  # conversations without the tokenizer's special tokens, plain text with them
        positions = [position for position, (_, _, kind) in prepared.items() if kind == rendered]
        if not positions:
            continue
        offsets = any(prepared[position][1] is not None for position in positions)
        encoded = _encode(tokenizer, [prepared[position][0] for position in positions], not rendered, offsets)
        for position, tokens in zip(positions, encoded, strict=True):
            if isinstance(tokens, RowError):
                results[position] = tokens
                continue
            try:
                results[position] = _labelled(tokens["input_ids"], tokens.get("offset_mapping"),
                                              prepared[position][1], settings)
            except RowError as error:
                results[position] = error
    return results


def tokenize_record(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                    settings: TokenizeSettings) -> dict[str, Any]:
    """One record's ``input_ids`` and ``labels``; RowError when it cannot train."""
    (result,) = tokenize_records([record], tokenizer, settings)
    if isinstance(result, RowError):
        raise result
    return result
