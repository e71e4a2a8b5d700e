"""``sftkit chat``: talk to a trained model (a full model, or a LoRA adapter on its base) through the chat template
it was trained with, its answer streamed as it is generated. ``--prompt`` asks one question and exits (scripts,
tests); without it, a loop in the terminal keeps the conversation until ``/exit``, and ``/reset`` starts over."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO

import torch

from sftkit.contract import RowError
from sftkit.errors import SftkitError
from sftkit.outputs.generation import Answer, answer
from sftkit.outputs.trained import Trained, open_trained

logger = logging.getLogger(__name__)

COMMANDS = "/reset starts a new conversation, /exit (or Ctrl-D) quits"


class Conversation:
    """The turns so far with one model; each reply is generated from all of them."""

    def __init__(self, trained: Trained, system: str | None, max_new_tokens: int) -> None:
        self.trained = trained
        self.opening = [{"role": "system", "content": system}] if system else []
        self.max_new_tokens = max_new_tokens
        self.messages: list[dict[str, Any]] = []

    def reply(self, text: str, out: TextIO) -> Answer:
        """The model's answer to ``text``, written to ``out`` as it is generated, and kept in the conversation."""
        asked = [*self.opening, *self.messages, {"role": "user", "content": text}]
        try:
            [reply] = answer(self.trained.model, self.trained.tokenizer, [asked], self.max_new_tokens, stream=out)
        except RowError as error:
            raise SftkitError(f"the model's chat template refuses this conversation: {error}") from None
        out.write("\n")
        if reply.end_token is None:
            logger.info("(the answer was cut at --max-new-tokens %d)", self.max_new_tokens)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
        return reply

    def reset(self) -> None:
        self.messages = []


def interactive(conversation: Conversation, out: TextIO, read: Callable[[str], str] = input) -> None:
    """Read a message, answer it, until /exit or the end of the input."""
    out.write(f"Type a message and press Enter; {COMMANDS}.\n")
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if text == "/exit":
            return
        if text == "/reset":
            conversation.reset()
            out.write("(a new conversation)\n")
        elif text.startswith("/"):
            out.write(f"unknown command {text}: {COMMANDS}\n")
        elif text:
            conversation.reply(text, out)


def chat(model: str, prompt: str | None, system: str | None, max_new_tokens: int, out: TextIO = sys.stdout) -> None:
    """Answer ``prompt`` and return, or talk in a loop when there is none."""
    trained = open_trained(model)
    if not trained.tokenizer.chat_template:
        raise SftkitError(f"{model}: its tokenizer has no chat template, so a conversation cannot be sent to it; train "
                          "with chat_template_path set to give it one")
    if torch.cuda.is_available():
        trained.model.to("cuda")
    logger.info("chat: %s", trained.describe(model))
    conversation = Conversation(trained, system, max_new_tokens)
    if prompt is not None:
        conversation.reply(prompt, out)
    else:
        interactive(conversation, out)
