"""Chat templates: rendering a conversation, finding the token that ends an assistant turn, and the rendering
used for training when the model's own template would hide what the data says.

A chat template is code from the model's repository: what it raises for a row (roles that must
alternate, a system role it does not support) is that row's problem, not the run's, so rendering
turns any exception into a ``RowError`` with the template's own message.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase
from trl.chat_template_utils import get_training_chat_template

from sftkit.contract import RowError, is_conversation
from sftkit.errors import SftkitError
from sftkit.records import REASONING_KEYS

REJECTED_BY_TEMPLATE = "rejected by chat template"


def tools_of(record: Mapping[str, Any]) -> list | None:
    tools = record.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools


def as_templates_read(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates read them: the reasoning under each name templates use (Qwen3 reads
    reasoning_content, gpt-oss thinking), sftkit's own ``weight`` left out."""
    out = []
    for message in messages:
        view = {key: value for key, value in message.items() if key != "weight"}
        if message.get("reasoning_content") is not None:
            for key in REASONING_KEYS:
                view.setdefault(key, message["reasoning_content"])
        out.append(view)
    return out


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], tools: list | None,
           generation_prompt: bool = False) -> str:
    """The template's text for ``messages``; whatever the template raises becomes a RowError for the row."""
    try:
        return tokenizer.apply_chat_template(as_templates_read(messages), tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as error:  # noqa: BLE001 - the template's code (jinja raise_exception, a KeyError, ...) judged the row
        raise RowError(f"the chat template rejects this conversation: {type(error).__name__}: {error}",
                       reason=REJECTED_BY_TEMPLATE) from None


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    return set(tokenizer.all_special_ids) | {
        token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
    }


def end_of_turn_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template writes right after an assistant's text (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>, Llama 2's </s> after a space); None when the template marks no end of a turn with one."""
    if not tokenizer.chat_template:
        return None
    marker = "sftkit-end-of-turn-probe"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except jinja2.TemplateSyntaxError as error:
        raise SftkitError(f"the chat template is not valid Jinja: {error.message} (line {error.lineno} of the "
                          "template). Fix it, or set chat_template_path to a template that is.") from None
    except Exception as error:  # noqa: BLE001 - a template that cannot render one exchange cannot train anything
        raise SftkitError(f"the chat template cannot render a user turn followed by an assistant turn: {error}. "
                          "Set chat_template_path to a template that can.") from None
    after = rendered.split(marker, 1)[-1].lstrip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    return ids[0] if ids and ids[0] in special_token_ids(tokenizer) else None


# A conversation whose earlier turns a template may rewrite once later turns follow (Qwen3 drops their reasoning).
PROBE = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nR\n</think>\n\nA"},
         {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]


def _renders_incrementally(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether each assistant turn's prompt, and the conversation up to that turn, render as prefixes of the whole
    conversation (a template that writes a closing only at the very end, like Phi-3's, fails this harmlessly: TRL
    has no other version of it)."""
    text = render(tokenizer, PROBE, None)
    return all(text.startswith(render(tokenizer, PROBE[:index], None, generation_prompt=True))
               and text.startswith(render(tokenizer, PROBE[: index + 1], None))
               for index, message in enumerate(PROBE) if message["role"] == "assistant")


def rendering_tokenizer(tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedTokenizerBase, str | None]:
    """The tokenizer that renders training rows, and a note when it is not the model's own.

    A template that rewrites earlier turns once later ones follow hides what the data says (earlier
    reasoning is dropped). Where TRL ships a training version of such a template (earlier turns kept as
    written), rows are rendered with it, so every turn trains; the model keeps its own template for
    inference. Other templates stay as they are: a reply they rewrite is left untrained, and noted
    (``sftkit.data.tokenization``).
    """
    if not tokenizer.chat_template:
        return tokenizer, None
    try:
        if _renders_incrementally(tokenizer):
            return tokenizer, None
    except RowError:  # the probe itself is rejected (a template of strict role rules): judged row by row instead
        return tokenizer, None
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
                       "which keeps earlier turns as the data has them (a reply it still rewrites is left untrained "
                       "and counted; the saved model keeps its own template)")


def reply_end(tokenizer: PreTrainedTokenizerBase) -> tuple[str | None, bool, str | None]:
    """How an assistant reply ends in training: (the token text that ends it, whether sftkit appends the EOS to
    each reply, a note for the log).

    A template that writes no special token after a reply (Alpaca-style, ChatQA, Falcon) would train a model
    that never stops. The tokenizer's EOS is then trained after each reply; without an EOS there is no stop
    marker to train, and the run is refused.
    """
    if not tokenizer.chat_template:
        return None, False, None
    token_id = end_of_turn_token_id(tokenizer)
    if token_id is not None:
        return tokenizer.convert_ids_to_tokens(token_id), False, None
    if tokenizer.eos_token is None:
        raise SftkitError(
            "the chat template marks no end of an assistant turn with a special token and the tokenizer has no EOS "
            "token, so the model could never learn to stop. Set eos_token in the recipe (a token of the "
            "vocabulary), or chat_template_path to a template that ends each turn with one."
        )
    return tokenizer.eos_token, True, (
        f"chat template: it marks no end of an assistant turn with a special token; the tokenizer's EOS "
        f"{tokenizer.eos_token!r} is trained after each reply, so the model learns to stop")


def require_chat_template(tokenizer: PreTrainedTokenizerBase, record: Mapping[str, Any] | None, model: str) -> None:
    """Conversations need a chat template to become text: without one, say how to set it before any row is read."""
    if record is not None and is_conversation(record) and not tokenizer.chat_template:
        raise SftkitError(
            f"the data holds conversations, and the tokenizer of {model} has no chat template to render them (a base "
            "model often has none). Set chat_template_path to a template: a .jinja file, or the directory or Hub id "
            "of a tokenizer that has one (such as the instruct model of the same family); or set dataset_format to "
            "text to train on plain text."
        )
