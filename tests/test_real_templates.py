"""Real chat templates, as their models ship them (the copies TRL bundles), on conversations with a system prompt,
tools, parallel tool calls, tool results and reasoning: each trains exactly the assistant's own output (its text,
its tool calls, its reasoning where the template renders it, its end-of-turn marker), or the row is refused with the
right reason. docs/formats.md says what was found for each, and for templates of a serving project."""

from __future__ import annotations

from pathlib import Path

import pytest
import trl
from chat_templates import template_tokenizer
from test_tokenization import trained_runs

from sftkit.contract import RowError
from sftkit.data.templates import rendering_tokenizer, reply_end
from sftkit.data.tokenization import (
    CONTEXT_DIFFERS,
    PROMPT_MISMATCH,
    REASONING_HIDDEN,
    REWRITTEN_TURN,
    TOOL_CALLS_DROPPED,
    TokenizeSettings,
    tokenize_record,
)

TEMPLATES = Path(trl.__file__).parent / "chat_templates"
TOOLS = [{"type": "function", "function": {"name": name, "description": f"The {what} in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}
         for name, what in (("get_weather", "weather"), ("get_time", "time"))]
SYSTEM = {"role": "system", "content": "You are a terse assistant for Veloria."}


def call(name: str, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": {"city": "Amberhold"}}}


CONVERSATIONS = {
    "plain": [SYSTEM, {"role": "user", "content": "Capital of Veloria?"}, {"role": "assistant", "content": "Amberhold."},
              {"role": "user", "content": "And its river?"}, {"role": "assistant", "content": "The Silverrun."}],
    "parallel tools": [SYSTEM, {"role": "user", "content": "Weather and time in Amberhold?"},
                       {"role": "assistant", "content": "", "tool_calls": [call("get_weather", "call1abcd"),
                                                                           call("get_time", "call2efgh")]},
                       {"role": "tool", "tool_call_id": "call1abcd", "content": '{"sky": "clear", "temp": "fourteen"}'},
                       {"role": "tool", "tool_call_id": "call2efgh", "content": 'noon "sharp"'},
                       {"role": "assistant", "content": "Clear, at noon."}],
    "reasoning": [{"role": "user", "content": "What is 17 * 3?"},
                  {"role": "assistant", "reasoning_content": "Seventeen times three is fifty-one.", "content": "51."},
                  {"role": "user", "content": "And plus nine?"},
                  {"role": "assistant", "reasoning_content": "Fifty-one plus nine is sixty.", "content": "60."}],
    "reasoning and a tool": [SYSTEM, {"role": "user", "content": "Weather in Amberhold?"},
                             {"role": "assistant", "reasoning_content": "I should call the weather tool.",
                              "content": "", "tool_calls": [call("get_weather", "call1abcd")]},
                             {"role": "tool", "tool_call_id": "call1abcd", "content": "fourteen degrees"},
                             {"role": "assistant", "reasoning_content": "The tool answered.", "content": "It is mild."}],
}
TRAINS, REJECTED = "trains", "rejected by chat template"
# template file, BOS, EOS, and per conversation: TRAINS with the notes, or the reason the row is refused.
EXPECTED = {
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>", {  # parallel calls: the template raises
        "plain": TRAINS, "parallel tools": REJECTED, "reasoning": (TRAINS, REASONING_HIDDEN),
        "reasoning and a tool": (TRAINS, REASONING_HIDDEN)}),
    "llama3_2": ("<|begin_of_text|>", "<|eot_id|>", {
        "plain": TRAINS, "parallel tools": REJECTED, "reasoning": (TRAINS, REASONING_HIDDEN),
        "reasoning and a tool": (TRAINS, REASONING_HIDDEN)}),
    "qwen2_5": (None, "<|im_end|>", {
        "plain": TRAINS, "parallel tools": TRAINS, "reasoning": (TRAINS, REASONING_HIDDEN),
        "reasoning and a tool": (TRAINS, REASONING_HIDDEN)}),
    "qwen3": (None, "<|im_end|>", {  # rendered with TRL's training version: every reply keeps its reasoning
        "plain": TRAINS, "parallel tools": TRAINS, "reasoning": TRAINS, "reasoning and a tool": TRAINS}),
    "gemma3": ("<bos>", "<eos>", {  # no tool role: roles must alternate
        "plain": TRAINS, "parallel tools": REJECTED, "reasoning": (TRAINS, REASONING_HIDDEN),
        "reasoning and a tool": REJECTED}),
    "cohere": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", {
        "plain": TRAINS, "parallel tools": REJECTED, "reasoning": (TRAINS, REASONING_HIDDEN),
        "reasoning and a tool": REJECTED}),
    "phi3_5": ("<s>", "<|endoftext|>", {  # renders no tool calls
        "plain": TRAINS, "parallel tools": TOOL_CALLS_DROPPED, "reasoning": (TRAINS, REASONING_HIDDEN),
        "reasoning and a tool": TOOL_CALLS_DROPPED}),
    "gptoss": (None, "<|return|>", {  # history ends replies with <|end|>, generation with <|return|>; one call a turn
        "plain": (TRAINS, REWRITTEN_TURN), "parallel tools": TOOL_CALLS_DROPPED,
        "reasoning": (TRAINS, REWRITTEN_TURN, REASONING_HIDDEN),
        "reasoning and a tool": (TRAINS, REWRITTEN_TURN, REASONING_HIDDEN)}),
    "glm4moe": ("[gMASK]", "<|endoftext|>", {  # earlier reasoning dropped once a later reply follows
        "plain": TRAINS, "parallel tools": TRAINS, "reasoning": (TRAINS, REWRITTEN_TURN, REASONING_HIDDEN),
        "reasoning and a tool": TRAINS}),
    "deepseekv3": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", {  # prompts with <think>, renders replies without
        "plain": PROMPT_MISMATCH, "parallel tools": PROMPT_MISMATCH, "reasoning": PROMPT_MISMATCH,
        "reasoning and a tool": PROMPT_MISMATCH}),
    "deepseek_r1_distill": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", {
        "plain": PROMPT_MISMATCH, "parallel tools": TOOL_CALLS_DROPPED, "reasoning": PROMPT_MISMATCH,
        "reasoning and a tool": TOOL_CALLS_DROPPED}),
}


def settings_for(tokenizer) -> TokenizeSettings:
    end_of_turn, appended, _ = reply_end(tokenizer)
    return TokenizeSettings(max_length=None, truncate=True, truncation_mode="keep_start", long_rows="truncate",
                            assistant_only_loss=True, completion_only_loss=None, end_of_turn=end_of_turn,
                            eos_after_replies=appended)


def assistant_pieces(message: dict) -> list[str]:
    return [piece for piece in (message.get("content"), message.get("reasoning_content"),
                                *(call["function"]["name"] for call in message.get("tool_calls", []))) if piece]


@pytest.mark.parametrize("template", EXPECTED)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_a_real_template_trains_exactly_the_replies_or_refuses_the_row(template, conversation):
    bos, eos, outcomes = EXPECTED[template]
    tokenizer, _ = rendering_tokenizer(template_tokenizer((TEMPLATES / f"{template}.jinja").read_text(), bos, eos))
    messages = CONVERSATIONS[conversation]
    record = {"messages": messages, **({"tools": TOOLS} if "tool" in conversation else {})}
    expected = outcomes[conversation]
    expected = expected if isinstance(expected, tuple) else (expected,)
    try:
        tokens = tokenize_record(record, tokenizer, settings_for(tokenizer))
    except RowError as error:
        assert expected == (error.reason,), str(error)
        return
    assert expected[0] == TRAINS, f"trained, but expected {expected}"
    assert set(tokens["notes"]) - {CONTEXT_DIFFERS} == set(expected[1:])
    runs = trained_runs(tokenizer, tokens)
    replies = [message for message in messages if message["role"] == "assistant"]
    assert len(runs) == len(replies) - tokens["notes"].count(REWRITTEN_TURN)
    trained = "".join(runs)
    for message in messages:  # nothing of the prompt, the tools or the tool results trains
        if message["role"] != "assistant":
            assert message["content"] not in trained
    assert "The weather in a city" not in trained
    for reply, run in zip(replies[-len(runs):], runs, strict=True):  # each reply trains its text and its tool calls
        assert all(piece in run for piece in assistant_pieces(reply) if piece != reply.get("reasoning_content")
                   or REASONING_HIDDEN not in tokens["notes"])
        assert any(run.endswith(token) for token in tokenizer.all_special_tokens)  # a stop marker trains


def test_generation_stops_at_the_marker_training_trains_when_rows_render_with_trls_training_template():
    """GLM-4's own template writes nothing after a reply; TRL's training version ends each with <|user|>, which is
    what the rows train: generation must stop there."""
    from transformers import GenerationConfig

    from sftkit.train.model import stop_on_end_of_turn

    tokenizer = template_tokenizer((TEMPLATES / "glm4moe.jinja").read_text(), "[gMASK]", "<|endoftext|>")
    assert reply_end(tokenizer)[1]  # the model's own template: no marker, the EOS would be appended
    config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    stop = stop_on_end_of_turn(config, tokenizer)
    assert stop == tokenizer.convert_tokens_to_ids("<|user|>") and config.eos_token_id == [tokenizer.eos_token_id, stop]


def test_a_template_that_is_not_valid_jinja_is_named_so_with_its_line():
    from sftkit.errors import SftkitError

    broken = template_tokenizer("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}", None, "<|im_end|>")
    with pytest.raises(SftkitError, match=r"not valid Jinja: .* \(line 2 of the template\)"):
        reply_end(broken)
