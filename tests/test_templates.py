"""Assistant-only loss under the chat templates of the model families people fine-tune: exactly the replies and a
stop marker train, and what training renders before a reply is what inference sends."""

from __future__ import annotations

import pytest
from chat_templates import FAMILIES, family_tokenizer

from sftkit.data.templates import end_of_turn_token_id, reply_end
from sftkit.data.tokenization import IGNORE, TokenizeSettings, tokenize_record
from sftkit.errors import SftkitError
from sftkit.jobs.check import inference_prompt

SYSTEM = {"role": "system", "content": "Be brief."}
FIRST = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]
SECOND = [{"role": "user", "content": "Capital of Veloria?"}, {"role": "assistant", "content": "Amberhold."}]


def settings(tokenizer, **changes) -> TokenizeSettings:
    end_of_turn, appended, _ = reply_end(tokenizer)
    values = {"max_length": None, "truncate": True, "truncation_mode": "keep_start", "long_rows": "truncate",
              "assistant_only_loss": True, "completion_only_loss": None, "end_of_turn": end_of_turn,
              "eos_after_replies": appended}
    return TokenizeSettings(**{**values, **changes})


def trained_runs(tokenizer, tokens) -> list[str]:
    runs, current = [], []
    for token, label in zip(tokens["input_ids"], tokens["labels"], strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return [*runs, tokenizer.decode(current)] if current else runs


@pytest.mark.parametrize("name", FAMILIES)
def test_the_replies_and_their_stop_marker_train_and_nothing_else(name):
    tokenizer, family = family_tokenizer(name), FAMILIES[name]
    messages = [*([SYSTEM] if family.system else []), *FIRST, *SECOND]
    tokens = tokenize_record({"messages": messages}, tokenizer, settings(tokenizer))
    before, stop = family.reply
    assert trained_runs(tokenizer, tokens) == [f"{before}2 + 3 = 5.{stop}", f"{before}Amberhold.{stop}"]
    bos = tokenizer.bos_token_id
    assert bos is None or tokens["input_ids"][:2] != [bos, bos]  # the template's BOS, not one more from the tokenizer


@pytest.mark.parametrize("name", FAMILIES)
def test_training_renders_the_prompt_inference_sends(name):
    """The tokens before the last reply are exactly apply_chat_template(..., add_generation_prompt=True)'s. Templates
    that mark no end of a reply get the EOS after each reply in training, which inference's rendering of earlier
    replies lacks: for them the first exchange is compared, where there are no earlier replies."""
    tokenizer, family = family_tokenizer(name), FAMILIES[name]
    conversation = [*([SYSTEM] if family.system else []), *FIRST]
    if not reply_end(tokenizer)[1]:
        conversation += SECOND
    record = {"messages": conversation}
    tokens = tokenize_record(record, tokenizer, settings(tokenizer))
    sent = inference_prompt(record, tokenizer)
    assert tokens["input_ids"][: len(sent)] == sent
    assert tokens["labels"][len(sent) - 1] == IGNORE and tokens["labels"][len(sent)] != IGNORE  # the reply starts there


@pytest.mark.parametrize("name", ["alpaca", "chatqa"])
def test_templates_that_mark_no_end_of_turn_train_the_eos_after_each_reply(name):
    tokenizer = family_tokenizer(name)
    assert end_of_turn_token_id(tokenizer) is None
    end_of_turn, appended, note = reply_end(tokenizer)
    assert (end_of_turn, appended) == (tokenizer.eos_token, True) and "trained after each reply" in note
    tokens = tokenize_record({"messages": FIRST}, tokenizer, settings(tokenizer))
    assert tokens["input_ids"][-1] != tokenizer.eos_token_id or tokens["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id in [label for label in tokens["labels"] if label != IGNORE]


def test_a_template_without_end_of_turn_and_a_tokenizer_without_eos_is_refused():
    tokenizer = family_tokenizer("alpaca")
    tokenizer.eos_token = None
    with pytest.raises(SftkitError, match="marks no end of an assistant turn.*no EOS token.*Set eos_token"):
        reply_end(tokenizer)
