"""Answering conversations as inference will: the model's chat template and generation config, stopping at the end
of the assistant's turn. Sample answers during training and ``sftkit chat`` both answer through here."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from transformers import PreTrainedTokenizerBase, TextStreamer

from sftkit.data.templates import render
from sftkit.train.attention import VARLEN
from sftkit.train.model import stop_on_end_of_turn


@dataclass(frozen=True)
class Answer:
    text: str
    new_tokens: int  # generated, the end token included
    end_token: int | None  # the token it stopped at; None when it was cut at max_new_tokens


def end_tokens(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The model's end tokens, the chat template's end of turn and the tokenizer's EOS: the generation config of a
    base model (under an adapter) may lack the end of turn that the replies were trained to end with."""
    config = copy.deepcopy(model.generation_config)
    stop_on_end_of_turn(config, tokenizer)
    ends = [] if config.eos_token_id is None else list(config.eos_token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ends:
        ends.append(tokenizer.eos_token_id)
    return ends


class _Stream(TextStreamer):
    """The answer's text, written to ``out`` as it is generated (the prompt is not)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text)
        self.out.flush()


@contextlib.contextmanager
def _generating(model: Any) -> Iterator[None]:
    """Eval mode without gradients, put back as it was after. sftkit's variable-length attention attends within
    packed training rows only, so a model that trains with it generates with sdpa meanwhile."""
    training, implementation = model.training, model.config._attn_implementation
    if implementation == VARLEN:
        model.set_attn_implementation("sdpa")
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)
        if implementation == VARLEN:
            model.set_attn_implementation(VARLEN)


def answer(model: Any, tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Sequence[Mapping[str, Any]]],
           max_new_tokens: int, tools: Sequence[list | None] | None = None,
           stream: TextIO | None = None) -> list[Answer]:
    """Each conversation's next assistant turn, generated in one batch (padded on the left).

    ``tools``: each conversation's tool definitions, if any. ``stream`` receives the text as it is generated
    (a single conversation).
    """
    tools = tools or [None] * len(conversations)
    texts = [render(tokenizer, messages, definitions, generation_prompt=True)
             for messages, definitions in zip(conversations, tools, strict=True)]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    ends = end_tokens(model, tokenizer)
    streamer = _Stream(tokenizer, stream) if stream is not None else None
    with _generating(model):
        output = model.generate(**batch.to(model.device), max_new_tokens=max_new_tokens, eos_token_id=ends,
                                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0],
                                use_cache=True, streamer=streamer)
    answers = []
    for generated in output[:, batch["input_ids"].shape[1]:].tolist():
        end = next((position for position, token in enumerate(generated) if token in ends), None)
        kept = generated if end is None else generated[:end]
        answers.append(Answer(tokenizer.decode(kept, skip_special_tokens=True).strip(),
                              len(generated) if end is None else end + 1, None if end is None else generated[end]))
    return answers
