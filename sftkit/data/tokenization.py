"""Tokenize and mask: a canonical record becomes ``input_ids`` and ``labels`` (-100 where no loss is taken), with
notes of what a reader of the run should know about the row.

Loss masking is computed from character spans of the rendered text, so it needs no
``{% generation %}`` markers in the chat template: an assistant turn is everything the template
adds between the prompt for that turn (``add_generation_prompt=True``) and the turn's end-of-turn
token, inclusive. The end-of-turn token is therefore trained (the model learns to stop) and the
template's formatting around it is not. A token is trained when its characters overlap a trained
span, so a completion's first word keeps its loss even when the prompt ends in the space before it.

Every row is checked as it is rendered, not a sample: a turn the template drops, or a reply that would train
without its text or its tool calls, makes the row invalid. A turn with ``weight: 0`` is not trained; a reply the
template rewrites once later turns follow is left untrained; reasoning the template does not render, and rows cut
to ``max_length``, are noted.

Text and string prompt/completion rows are tokenized as TRL tokenizes them, with the tokenizer's
special tokens (the BOS of Llama, Mistral and Gemma tokenizers); rendered conversations without,
since their template writes its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from sftkit.contract import RowError, record_shape
from sftkit.data import rendered
from sftkit.data.templates import render, reply_end, tools_of

IGNORE = -100
TOKENIZER_FAILED = "tokenizer error"
TOO_LARGE = "too large"
# Text a row may hold (1 MiB of characters): rendering and tokenizing one row takes about 250 bytes of memory a
# character, so a 50 MB row would take 12 GB before max_length could cut it.
ROW_CHARACTERS = 1 << 20
SPLITTING_STRATEGIES = ("bfd_split", "wrapped")  # packing strategies that keep a long row's overflow
Span = tuple[int, int]

# Why a row cannot train (the bad-row report counts rows by these).
TURN_DROPPED = "turn dropped by the chat template"
TOOL_CALLS_DROPPED = "tool calls dropped by the chat template"
PROMPT_MISMATCH = "reply does not follow its prompt"
REWRITTEN_UNTRAINED = "weight 0 turn rewritten by the chat template"
# What is worth knowing about a row that trains (counted the same way, by occurrence).
UNTRAINED_TURN = "assistant turns left untrained (weight 0)"
REWRITTEN_TURN = "assistant turns the chat template rewrites once later turns follow (left untrained)"
REASONING_HIDDEN = "assistant turns whose reasoning the chat template does not render"
CONTEXT_DIFFERS = "assistant turns trained after context the template renders otherwise when prompting for them"
TRUNCATED = "rows cut to max_length"
STOP_CUT = "rows cut to max_length inside a trained reply (its stop marker not trained)"


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
    stop_token_ids: tuple[int, ...] = ()  # the tokens that end a reply or a text (end of turn, EOS)

    @classmethod
    def from_recipe(cls, recipe: Any, tokenizer: PreTrainedTokenizerBase) -> TokenizeSettings:
        args = recipe.training
        end_of_turn, eos_after_replies, _ = reply_end(tokenizer)
        stops = [tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None, tokenizer.eos_token_id]
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
            stop_token_ids=tuple(dict.fromkeys(token for token in stops if token is not None)),
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


@dataclass
class Rendering:
    """A record as text to tokenize, and which of its characters train."""

    text: str
    trained: list[Span] | None  # the spans that train; None: every character does
    untrained: list[Span] = field(default_factory=list)  # never trained, even when every other character is
    conversation: bool = True  # rendered by the chat template: tokenized without the tokenizer's special tokens
    notes: list[str] = field(default_factory=list)


MARK = "\x00"  # a reply's text no template writes, to find where a reply goes in a rendering


def _reply(messages: Sequence[Mapping[str, Any]], index: int, tools: list | None,
           tokenizer: PreTrainedTokenizerBase, end_of_turn: str | None) -> tuple[str, str]:
    """Assistant turn ``index`` as the model writes it at inference: (the prompt inference sends for it, the reply
    through its end-of-turn marker), from the rendering of the conversation up to and including it.

    The reply starts where the prompt (the conversation before it, with the generation prompt) ends. A conversation
    that starts with an assistant turn has no prompt: its reply starts after what the template writes before any
    turn (a default system prompt, a header), which is not trained.
    """
    own = render(tokenizer, messages[: index + 1], tools)
    if not index:
        start = _common_prefix(own, render(tokenizer, [{"role": "assistant", "content": MARK}], tools))
        prompt = own[:start]
    else:
        prompt = render(tokenizer, messages[:index], tools, generation_prompt=True)
        start = len(prompt) if own.startswith(prompt) else _start_after_rewrite(messages, index, tools, tokenizer,
                                                                                  prompt, own)
    return prompt, own[start:_through_end_of_turn(own, start, len(own), end_of_turn)]


def _start_after_rewrite(messages: Sequence[Mapping[str, Any]], index: int, tools: list | None,
                         tokenizer: PreTrainedTokenizerBase, prompt: str, own: str) -> int:
    """Where reply ``index`` starts in ``own`` when the template renders the earlier turns otherwise once a reply
    follows them (gpt-oss drops earlier reasoning once a final answer follows): right after the generation prompt,
    as it stands before a marker reply in the same place. A reply the generation prompt does not open (a template
    that prompts with ``<think>`` but renders replies without it) cannot be told from its prompt: a RowError."""
    context = render(tokenizer, messages[:index], tools)
    generation = prompt[len(context):] if prompt.startswith(context) else ""
    marked = render(tokenizer, [*messages[:index], {"role": "assistant", "content": MARK}], tools)
    begin = marked.rfind(generation, 0, max(marked.find(MARK), 0)) if generation else -1
    if begin >= 0 and own.startswith(marked[: begin + len(generation)]):
        return begin + len(generation)
    same = _common_prefix(own, prompt)
    shown = f"{prompt[same:same + 60]!r} where the chat template renders {own[same:same + 60]!r} (after " \
            f"{own[max(0, same - 40):same]!r})"
    if rendered.normalise(own).startswith(rendered.normalise(prompt)):
        raise RowError(
            f"assistant turn {index}: the prompt inference sends for it and the chat template's rendering of the turn "
            f"differ only in whitespace: inference sends {shown}, so a model trained on this row would learn "
            "whitespace inference never sends. Fix the template's whitespace (jinja's {%- and -%}) and set "
            "chat_template_path to the fixed template", reason=PROMPT_MISMATCH)
    if generation and own.startswith(context):
        shown = f"{generation!r}, where the chat template renders the turn as {own[len(context):][:80]!r}"
    if "<think>" in prompt[same:]:
        hint = ("The template opens each reply with <think> and reads the reasoning only from the reply's text: write "
                "it there, as <think>...</think> before the answer")
    else:
        hint = ("The template writes into the prompt what it does not write before the reply once the reply is there "
                "(such as a system prompt added only when prompting)")
    raise RowError(
        f"assistant turn {index}: inference prompts it with {shown}, so a model trained on this row would be prompted "
        f"with text it never saw before a reply. {hint}; or set chat_template_path to a template that renders replies "
        "as it prompts for them", reason=PROMPT_MISMATCH)


def _check_reply(reply: str, message: Mapping[str, Any], index: int) -> None:
    """A reply that trains must show its text and its tool calls: a template that drops them would train an empty
    reply (its end-of-turn marker alone)."""
    if rendered.shows(reply, message):
        return
    if message.get("tool_calls") and rendered.shows(reply, {"content": message.get("content")}):
        raise RowError(f"assistant turn {index}: the chat template dropped this turn's tool calls, so the reply would "
                       f"train as {reply!r:.120}; use a template that renders tool calls (chat_template_path)",
                       reason=TOOL_CALLS_DROPPED)
    raise RowError(f"assistant turn {index}: the chat template dropped this reply, which would train as "
                   f"{reply!r:.120}", reason=TURN_DROPPED)


def conversation_rendering(messages: Sequence[Mapping[str, Any]], tools: list | None,
                           tokenizer: PreTrainedTokenizerBase, settings: TokenizeSettings, trained: Sequence[bool],
                           every_token: bool) -> Rendering:
    """The rendered conversation, checked to show every turn, and which of it trains: the assistant turns
    ``trained`` marks, each as the model writes it at inference (``_reply``) through its end-of-turn marker; or, with
    ``every_token``, everything but the turns left untrained (``weight: 0``).

    Each reply is taken from the rendering of the conversation up to it and found, in order, in the whole
    rendering. A template that renders each conversation as a prefix of the next has it right after its prompt; one
    that moves earlier context (a system prompt into the last user turn) has it further on, after context
    inference would send otherwise (noted). One that rewrites a
    reply once later turns follow (dropping its reasoning, say) has it nowhere: that turn is left untrained and
    noted, since training it would teach the rewritten reply. With ``every_token``, replies are located only where
    a turn is left untrained or calls tools; the rest is checked in the whole rendering.
    """
    text = render(tokenizer, messages, tools)
    seen = rendered.appearance(messages, text)
    if seen.missing:
        index = seen.missing[0]
        role = messages[index]["role"]
        raise RowError(f"turn {index} ({role}) is missing from the chat template's rendering of the row (the template "
                       f"may not render the {role} role or this turn's form); the row renders as {text!r:.200}",
                       reason=TOOL_CALLS_DROPPED if messages[index].get("tool_calls") else TURN_DROPPED)
    out = Rendering(text, None if every_token else [])
    locate = not every_token or any(message.get("weight") == 0 or message.get("tool_calls") for message in messages)
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if message.get("weight") == 0:
            out.notes.append(UNTRAINED_TURN)
        if not locate or not (trained[index] or every_token):
            if index in seen.reasoning_hidden:
                out.notes.append(REASONING_HIDDEN)
            continue
        prompt, reply = _reply(messages, index, tools, tokenizer, settings.end_of_turn)
        as_prompted = text.startswith(prompt) and text.startswith(reply, len(prompt))
        start = len(prompt) if as_prompted else text.find(reply, cursor)
        if start < 0:
            if every_token and not trained[index]:
                raise RowError(f"assistant turn {index} has weight 0, but the chat template rewrites it once later "
                               "turns follow, so it cannot be left out of training", reason=REWRITTEN_UNTRAINED)
            if not every_token:
                out.notes.append(REWRITTEN_TURN)
            if index in seen.reasoning_hidden:
                out.notes.append(REASONING_HIDDEN)
            continue
        span = (start, start + len(reply))
        cursor = span[1]
        if trained[index]:
            _check_reply(reply, message, index)
            if not as_prompted:
                out.notes.append(CONTEXT_DIFFERS)
        if not rendered.shows_reasoning(reply, message):
            out.notes.append(REASONING_HIDDEN)
        if every_token and not trained[index]:
            out.untrained.append(span)
        elif not every_token and trained[index]:
            out.trained.append(span)
    return out


def _plain(text: str, prompt: str | None, tokenizer: PreTrainedTokenizerBase, train_prompt: bool) -> Rendering:
    """Text (after a text prompt, if any) tokenized as TRL tokenizes it: the tokenizer's special tokens, the EOS at
    the end; a text prompt is not trained unless ``train_prompt``."""
    whole = (prompt or "") + text
    if tokenizer.eos_token and not whole.endswith(tokenizer.eos_token):
        whole += tokenizer.eos_token
    trained = None if prompt is None or train_prompt else [(len(prompt), len(whole))]
    return Rendering(whole, trained, conversation=False)


def rendering_of(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                 settings: TokenizeSettings) -> Rendering:
    """The text to tokenize for a canonical record and which of it trains."""
    shape = record_shape(record)
    if shape == "messages":
        messages = training_messages(record["messages"], settings, tokenizer.eos_token)
        trained = [message["role"] == "assistant" and message.get("weight") != 0 for message in messages]
        return conversation_rendering(messages, tools_of(record), tokenizer, settings, trained,
                                      every_token=not settings.assistant_only_loss)
    if shape == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        every_token = settings.completion_only_loss is False
        if isinstance(prompt, str):
            return _plain(completion, prompt, tokenizer, every_token)
        completion = training_messages(completion, settings, tokenizer.eos_token)
        trained = [message["role"] == "assistant" and message.get("weight") != 0
                   and (every_token or position >= len(prompt))
                   for position, message in enumerate([*prompt, *completion])]
        return conversation_rendering([*prompt, *completion], tools_of(record), tokenizer, settings, trained,
                                      every_token)
    return _plain(record["text"], None, tokenizer, True)


class TokenizedRowError(RowError):
    """A row that tokenized but cannot train; keeps its length for the length statistics."""

    def __init__(self, message: str, reason: str, length: int) -> None:
        super().__init__(message, reason)
        self.length = length


def _overlaps(offset: tuple[int, int], spans: Sequence[Span]) -> bool:
    """A token trains with a span when its characters overlap it (offsets are [start, end) in the text)."""
    return any(offset[0] < end and offset[1] > start for start, end in spans)


def _labelled(input_ids: list[int], offsets: list[tuple[int, int]] | None, rendering: Rendering,
              settings: TokenizeSettings) -> dict[str, Any]:
    """Labels from the trained character spans, then the max_length rule and the nothing-to-train check."""
    trained, untrained = rendering.trained, rendering.untrained
    if trained is None and not untrained:
        labels = list(input_ids)
    else:
        labels = [token if (trained is None or _overlaps(offset, trained)) and not _overlaps(offset, untrained)
                  else IGNORE for token, offset in zip(input_ids, offsets, strict=True)]
    notes, length, limit = list(rendering.notes), len(input_ids), settings.max_length
    if limit is not None and length > limit:
        if settings.long_rows == "skip":
            raise TokenizedRowError(f"{length} tokens, more than max_length {limit}", "too long", length)
        if settings.truncate:
            kept, cut = ((slice(-limit, None), slice(None, -limit)) if settings.truncation_mode == "keep_end"
                         else (slice(None, limit), slice(limit, None)))
            notes.append(TRUNCATED)
            if any(label in settings.stop_token_ids for label in labels[cut]):
                notes.append(STOP_CUT)
            input_ids, labels = input_ids[kept], labels[kept]
    if all(label == IGNORE for label in labels[1:]):
        raise TokenizedRowError(
            f"no token carries loss within max_length {limit} (the prompt alone fills it, or there is nothing "
            "to train on)",
            "no trained tokens",
            length,
        )
    return {"input_ids": list(input_ids), "labels": labels, "length": length, "notes": notes}


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
    """Many records with one batched tokenizer call per kind (the fast path): ``{input_ids, labels, length, notes}``
    each, or the RowError of a record that cannot train (or was already an error)."""
    results: list[dict[str, Any] | RowError] = list(records)
    renderings: dict[int, Rendering] = {}
    for position, record in enumerate(records):
        if isinstance(record, RowError):
            continue
        if (size := _characters(record)) > ROW_CHARACTERS:
            results[position] = RowError(
                f"the row holds {size:,} characters of text, more than the {ROW_CHARACTERS:,} a row may hold (its "
                "tokens would take gigabytes of memory before max_length cut them); split such a text into rows of "
                "its own", reason=TOO_LARGE)
            continue
        try:
            renderings[position] = rendering_of(record, tokenizer, settings)
        except RowError as error:
            results[position] = error
    for conversation in (True, False):  # conversations without the tokenizer's special tokens, plain text with them
        positions = [position for position, rendering in renderings.items() if rendering.conversation == conversation]
        if not positions:
            continue
        offsets = any(renderings[position].trained is not None or renderings[position].untrained
                      for position in positions)
        encoded = _encode(tokenizer, [renderings[position].text for position in positions], not conversation,
                          offsets)
        for position, tokens in zip(positions, encoded, strict=True):
            if isinstance(tokens, RowError):
                results[position] = tokens
                continue
            try:
                results[position] = _labelled(tokens["input_ids"], tokens.get("offset_mapping"), renderings[position],
                                              settings)
            except RowError as error:
                results[position] = error
    return results


def _characters(value: Any) -> int:
    """The characters of text a record holds, in every field."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_characters(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_characters(item) for item in value)
    return 0


def tokenize_record(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                    settings: TokenizeSettings) -> dict[str, Any]:
    """One record's ``input_ids`` and ``labels``; RowError when it cannot train."""
    (result,) = tokenize_records([record], tokenizer, settings)
    if isinstance(result, RowError):
        raise result
    return result
