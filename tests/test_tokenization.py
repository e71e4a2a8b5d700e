"""Loss masking, token by token, with the embedded tokenizer and Qwen2.5's ChatML template (no generation markers)."""

from __future__ import annotations

import pytest

from sftkit.contract import RowError
from sftkit.data.templates import rendering_tokenizer
from sftkit.data.tokenization import (
    IGNORE,
    REASONING_HIDDEN,
    REWRITTEN_TURN,
    TokenizeSettings,
    tokenize_record,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And the capital of Veloria?"},
    {"role": "assistant", "content": "Amberhold."},
]


def settings(**changes) -> TokenizeSettings:
    values = {"max_length": None, "truncate": True, "truncation_mode": "keep_start", "long_rows": "truncate",
              "assistant_only_loss": True, "completion_only_loss": None, "end_of_turn": "<|im_end|>",
              "eos_after_replies": False}
    return TokenizeSettings(**{**values, **changes})


def trained_runs(tokenizer, tokens) -> list[str]:
    """The trained tokens, decoded, one string per consecutive run."""
    runs, current = [], []
    for token, label in zip(tokens["input_ids"], tokens["labels"], strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_multi_turn_trains_each_assistant_turn_through_its_end_token_and_nothing_else(tokenizer):
    tokens = tokenize_record({"messages": CHAT}, tokenizer, settings())
    assert trained_runs(tokenizer, tokens) == ["2 + 3 = 5.<|im_end|>", "Amberhold.<|im_end|>"]
    assert tokenizer.decode(tokens["input_ids"]) == tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_without_assistant_only_loss_every_token_trains(tokenizer):
    tokens = tokenize_record({"messages": CHAT}, tokenizer, settings(assistant_only_loss=False))
    assert tokens["labels"] == tokens["input_ids"]


def test_template_without_special_end_token(tokenizer):
    original = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant:\n{% endif %}"
    )
    try:
        tokens = tokenize_record({"messages": CHAT[1:3]}, tokenizer, settings(end_of_turn=None))
    finally:
        tokenizer.chat_template = original
    assert trained_runs(tokenizer, tokens) == ["2 + 3 = 5.\n\n"]


def test_tool_calls_train_and_tool_results_do_not(tokenizer):
    messages = [
        {"role": "user", "content": "Weather in Amberhold?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Amberhold"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    runs = trained_runs(tokenizer, tokenize_record({"messages": messages}, tokenizer, settings()))
    assert len(runs) == 2
    assert '"name": "weather"' in runs[0] and '"city": "Amberhold"' in runs[0] and runs[0].endswith("<|im_end|>")
    assert runs[1] == "It is sunny.<|im_end|>"


def test_prompt_completion_text_trains_the_completion_and_eos(tokenizer):
    record = {"prompt": "Capital of Veloria:", "completion": " Amberhold."}
    tokens = tokenize_record(record, tokenizer, settings())
    assert trained_runs(tokenizer, tokens) == [" Amberhold.<|endoftext|>"]
    everything = tokenize_record(record, tokenizer, settings(completion_only_loss=False))
    assert everything["labels"] == everything["input_ids"]


def test_prompt_completion_messages(tokenizer):
    record = {"prompt": CHAT[:2], "completion": [CHAT[2]]}
    assert trained_runs(tokenizer, tokenize_record(record, tokenizer, settings())) == ["2 + 3 = 5.<|im_end|>"]


def test_text_trains_every_token_and_ends_with_eos(tokenizer):
    tokens = tokenize_record({"text": "Amberhold is the capital."}, tokenizer, settings())
    assert tokens["labels"] == tokens["input_ids"]
    assert tokenizer.decode(tokens["input_ids"]).endswith("<|endoftext|>")


def test_long_rows_truncate_or_skip(tokenizer):
    full = tokenize_record({"messages": CHAT}, tokenizer, settings())
    cut = tokenize_record({"messages": CHAT}, tokenizer, settings(max_length=50))
    assert len(cut["input_ids"]) == 50 and cut["length"] == full["length"] > 50
    assert cut["input_ids"] == full["input_ids"][:50]
    with pytest.raises(RowError) as error:
        tokenize_record({"messages": CHAT}, tokenizer, settings(max_length=50, long_rows="skip"))
    assert error.value.reason == "too long"


def test_prompt_filling_max_length_leaves_nothing_to_train(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(RowError) as error:
        tokenize_record({"messages": long_prompt}, tokenizer, settings(max_length=32))
    assert error.value.reason == "no trained tokens"


# Like Qwen3: only the last assistant turn keeps its reasoning, so an earlier reply is rewritten once a later one follows.
DROPS_EARLIER_REASONING = (
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ c }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REASONING_CHAT = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>add them up</think>A"},
                  {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]


def test_a_reply_the_template_rewrites_later_is_left_untrained_and_noted(tokenizer):
    """Training the rewritten reply would teach the model to answer without its reasoning: it is left out, and said."""
    original = tokenizer.chat_template
    tokenizer.chat_template = DROPS_EARLIER_REASONING
    try:
        tokens = tokenize_record({"messages": REASONING_CHAT}, tokenizer, settings())
        assert trained_runs(tokenizer, tokens) == ["B<|im_end|>"]
        assert tokens["notes"] == [REWRITTEN_TURN, REASONING_HIDDEN]
        assert rendering_tokenizer(tokenizer) == (tokenizer, None)  # TRL knows no training version of it
        every_token = tokenize_record({"messages": REASONING_CHAT}, tokenizer, settings(assistant_only_loss=False))
        assert every_token["notes"] == [REASONING_HIDDEN]  # the reasoning removed from the earlier turn is reported
    finally:
        tokenizer.chat_template = original


def test_template_that_drops_earlier_reasoning_renders_with_trl_training_version(tokenizer):
    """Qwen3's template drops an earlier turn's reasoning once a later turn follows; TRL's training version keeps it."""
    from trl.chat_template_utils import qwen3_chat_template

    original = tokenizer.chat_template
    tokenizer.chat_template = qwen3_chat_template
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    try:
        plain = tokenize_record({"messages": messages}, tokenizer, settings())  # not through TRL's version
        assert REWRITTEN_TURN in plain["notes"] and len(trained_runs(tokenizer, plain)) == 1
        rendering, note = rendering_tokenizer(tokenizer)
        assert rendering is not tokenizer and tokenizer.chat_template == qwen3_chat_template  # the model's own stays
        assert "TRL's training version" in note
        tokens = tokenize_record({"messages": messages}, rendering, settings())
        assert trained_runs(rendering, tokens) == ["<think>\nhmm\n</think>\n\nHello!<|im_end|>",
                                                   "<think>\n\n</think>\n\n4<|im_end|>"]
    finally:
        tokenizer.chat_template = original


def test_templates_that_keep_earlier_turns_are_used_as_they_are(tokenizer):
    assert rendering_tokenizer(tokenizer) == (tokenizer, None)  # Qwen2.5's ChatML


def test_plain_text_and_text_prompts_get_the_bos_the_tokenizer_adds_as_trl_does():
    from chat_templates import family_tokenizer

    llama = family_tokenizer("llama3")  # its tokenizer puts <|begin_of_text|> before plain text
    bos = llama.bos_token_id
    text = tokenize_record({"text": "Amberhold."}, llama, settings(end_of_turn="<|eot_id|>"))
    assert text["input_ids"][0] == bos and text["input_ids"].count(bos) == 1
    pair = tokenize_record({"prompt": "Capital?", "completion": " Amberhold."}, llama, settings(end_of_turn="<|eot_id|>"))
    assert pair["input_ids"][0] == bos and pair["labels"][0] == IGNORE
    chat = tokenize_record({"messages": CHAT[1:3]}, llama, settings(end_of_turn="<|eot_id|>"))
    assert chat["input_ids"][:2] != [bos, bos]  # the template writes its BOS; none is added on top


def test_the_first_completion_token_trains_when_the_prompt_ends_in_a_space(tokenizer):
    tokens = tokenize_record({"prompt": "The capital of Veloria is ", "completion": "Amberhold"}, tokenizer, settings())
    trained = trained_runs(tokenizer, tokens)
    assert trained == [" Amberhold<|endoftext|>"] or trained == ["Amberhold<|endoftext|>"]
    assert "Amberhold" in trained[0]  # the token that carries the completion's first word is not masked


def test_a_conversation_that_starts_with_the_reply_trains_only_the_reply(tokenizer):
    """Qwen2.5's template inserts a default system prompt and a header before a first assistant turn: not trained."""
    messages = [{"role": "assistant", "content": "Hello! Ask me about Veloria."}]
    tokens = tokenize_record({"messages": messages}, tokenizer, settings())
    assert trained_runs(tokenizer, tokens) == ["Hello! Ask me about Veloria.<|im_end|>"]


def test_keep_end_truncation_keeps_the_end(tokenizer):
    full = tokenize_record({"text": "word " * 40}, tokenizer, settings(assistant_only_loss=False))
    kept = tokenize_record({"text": "word " * 40}, tokenizer, settings(max_length=10, truncation_mode="keep_end"))
    assert kept["input_ids"] == full["input_ids"][-10:]
