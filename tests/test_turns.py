"""Every turn as the data says: a turn's weight, its reasoning and its tool-call ids reach training; every row is
checked as it is rendered (not a sample); a completion of several turns trains each reply; cuts are noted."""

from __future__ import annotations

import json

import pytest
import test_row_chain
from chat_templates import LLAMA3, family_tokenizer
from helpers import write_jsonl
from test_row_chain import by_row, prepared
from test_templates import settings as family_settings
from test_tokenization import settings, trained_runs
from trl.chat_template_utils import qwen3_chat_template

from sftkit.adapters.messages import MessagesAdapter, MessagesOptions
from sftkit.adapters.sharegpt import ShareGPTAdapter, ShareGPTOptions
from sftkit.contract import RowError
from sftkit.data import rendered
from sftkit.data.rows import RowChain
from sftkit.data.templates import rendering_tokenizer
from sftkit.data.tokenization import (
    CONTEXT_DIFFERS,
    IGNORE,
    PROMPT_MISMATCH,
    REASONING_HIDDEN,
    STOP_CUT,
    TOOL_CALLS_DROPPED,
    TRUNCATED,
    UNTRAINED_TURN,
    tokenize_record,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def chain(tokenizer, adapter=None, options=None, **changes) -> RowChain:
    return RowChain(adapter or MessagesAdapter(), options or MessagesOptions(), tokenizer, settings(**changes))


def one(chain_: RowChain, row: dict):
    (result,) = chain_([row])
    if isinstance(result, RowError):
        raise result
    return result


# ---------------------------------------------------------------- weight


def weighted(weight) -> list[dict]:
    return [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "Maybe 6.", "weight": weight},
            {"role": "user", "content": "Are you sure?"}, {"role": "assistant", "content": "2 + 3 = 5."}]


def test_a_turn_of_weight_zero_is_not_trained_and_is_counted(tokenizer):
    result = one(chain(tokenizer), {"messages": weighted(0)})
    assert trained_runs(tokenizer, result) == ["2 + 3 = 5.<|im_end|>"]
    assert result["notes"] == [UNTRAINED_TURN]
    assert trained_runs(tokenizer, one(chain(tokenizer), {"messages": weighted(1)})) == [
        "Maybe 6.<|im_end|>", "2 + 3 = 5.<|im_end|>"]


def test_weight_zero_holds_when_every_other_token_trains(tokenizer):
    result = one(chain(tokenizer, assistant_only_loss=False), {"messages": weighted(0)})
    text = tokenizer.decode([label for label in result["labels"] if label != IGNORE])
    assert "Are you sure?" in text and "2 + 3 = 5." in text and "Maybe 6." not in text


def test_weight_in_sharegpt_rows(tokenizer):
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey.", "weight": 0},
             {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye.", "weight": 1}]
    result = one(chain(tokenizer, ShareGPTAdapter(), ShareGPTOptions()), {"conversations": turns})
    assert trained_runs(tokenizer, result) == ["Goodbye.<|im_end|>"]


@pytest.mark.parametrize("weight", [0.5, 2, "0", -1, [0]])
def test_any_other_weight_makes_the_row_invalid(tokenizer, weight):
    with pytest.raises(RowError) as error:
        one(chain(tokenizer), {"messages": weighted(weight)})
    assert error.value.reason == "invalid weight" and "0 (the turn is not trained) or 1" in str(error.value)


def test_a_weight_on_a_turn_that_never_trains(tokenizer):
    messages = weighted(1)
    messages[0]["weight"] = 0  # harmless: a user turn is not trained anyway
    assert one(chain(tokenizer), {"messages": messages})
    messages[0]["weight"] = 1
    with pytest.raises(RowError, match="only assistant turns are trained"):
        one(chain(tokenizer), {"messages": messages})


def test_every_reply_of_weight_zero_leaves_nothing_to_train(tokenizer):
    messages = weighted(0)
    messages[3]["weight"] = 0
    with pytest.raises(RowError) as error:
        one(chain(tokenizer), {"messages": messages})
    assert error.value.reason == "no trained turn"


# ---------------------------------------------------------------- reasoning and tool-call ids reach the template


@pytest.mark.parametrize("where", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_reaches_a_template_that_renders_it(tokenizer, where):
    """Under Qwen3's template a reply whose reasoning is lost trains an empty <think></think>: the model would learn
    not to reason. Reasoning under any of its usual names reaches the template."""
    qwen3 = family_tokenizer("chatml")
    qwen3.chat_template = qwen3_chat_template
    qwen3, _ = rendering_tokenizer(qwen3)
    messages = [{"role": "user", "content": "What is 17 * 3?"},
                {"role": "assistant", where: "Seventeen times three is fifty-one.", "content": "51."}]
    result = one(chain(qwen3), {"messages": messages})
    assert trained_runs(qwen3, result) == ["<think>\nSeventeen times three is fifty-one.\n</think>\n\n51.<|im_end|>"]
    assert result["notes"] == []


# A template that reads an assistant turn's reasoning as ``reasoning`` (OpenAI's newer name; gpt-oss reads thinking).
READS_REASONING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.reasoning is defined %}[{{ m.reasoning }}] {% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("where", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_reaches_a_template_under_the_name_it_reads(tokenizer, where):
    template = family_tokenizer("chatml")
    template.chat_template = READS_REASONING
    messages = [{"role": "user", "content": "What is 17 * 3?"},
                {"role": "assistant", where: "Seventeen times three.", "content": "51."}]
    result = one(chain(template), {"messages": messages})
    assert trained_runs(template, result) == ["[Seventeen times three.] 51.<|im_end|>"] and result["notes"] == []


def test_reasoning_a_template_does_not_render_is_counted(tokenizer):
    messages = [{"role": "user", "content": "What is 17 * 3?"},
                {"role": "assistant", "reasoning_content": "Seventeen times three is fifty-one.", "content": "51."}]
    result = one(chain(tokenizer), {"messages": messages})  # Qwen2.5's template has no place for reasoning
    assert result["notes"] == [REASONING_HIDDEN]


def tool_conversation() -> list[dict]:
    return [{"role": "user", "content": "Weather in Amberhold and Brightwater?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call1abcd", "type": "function", "function": {"name": "get_weather",
                                                                      "arguments": {"city": "Amberhold"}}},
                {"id": "call2efgh", "type": "function", "function": {"name": "get_weather",
                                                                      "arguments": {"city": "Brightwater"}}}]},
            {"role": "tool", "tool_call_id": "call1abcd", "content": "18C"},
            {"role": "tool", "tool_call_id": "call2efgh", "content": "12C \"cold\""},
            {"role": "user", "content": "Which is warmer?"},
            {"role": "assistant", "content": "Amberhold, at 18C."}]


def test_tool_call_ids_reach_a_template_that_reads_them():
    """Mistral's templates write each call's id and each result's call_id; without them they refuse the row."""
    mistral = family_tokenizer("mistral-tools")
    result = one(chain(mistral, **family_settings(mistral).__dict__), {"messages": tool_conversation(),
                                                                       "tools": [WEATHER]})
    runs = trained_runs(mistral, result)
    assert len(runs) == 2 and '"id": "call1abcd"' in runs[0] and '"id": "call2efgh"' in runs[0]
    assert runs[1] == "Amberhold, at 18C.</s>"
    text = mistral.decode(result["input_ids"])
    assert '"call_id": "call2efgh"' in text and "12C \\\"cold\\\"" in text  # the result, as tojson escapes it


# ---------------------------------------------------------------- every row is checked


def test_a_reply_whose_tool_calls_the_template_drops_is_an_invalid_row():
    llama3 = family_tokenizer("llama3")  # Llama 3's base template renders each turn's content and nothing else
    with pytest.raises(RowError) as error:
        one(chain(llama3, **family_settings(llama3).__dict__), {"messages": tool_conversation()})
    assert error.value.reason == TOOL_CALLS_DROPPED
    assert "turn 1 (assistant)" in str(error.value)


def test_tool_results_rendered_as_json_strings_are_found():
    """Templates that write a tool result with tojson escape its quotes and newlines: still the same turn."""
    messages = [{"role": "user", "content": "Weather?"}, {"role": "tool", "content": 'Line one\n"quoted" é'},
                {"role": "assistant", "content": "Done."}]
    assert rendered.appearance(messages, json.dumps([m["content"] for m in messages])).missing == []
    assert rendered.appearance(messages, json.dumps([m["content"] for m in messages], ensure_ascii=False)).missing == []
    assert rendered.appearance(messages, "Weather? Done.").missing == [1]


def tool_rows(count: int, tool_rows_at: set[int]) -> list[dict]:
    rows = []
    for index in range(count):
        if index in tool_rows_at:
            rows.append({"messages": [{"role": "user", "content": f"Weather in city {index}?"},
                                      {"role": "assistant", "content": "", "tool_calls": [
                                          {"type": "function", "function": {"name": "get_weather",
                                                                            "arguments": {"city": f"c{index}"}}}]},
                                      {"role": "tool", "content": f"{index} degrees"},
                                      {"role": "assistant", "content": f"It is {index} degrees."}]})
        else:
            rows.append({"messages": [{"role": "user", "content": f"What is {index} + 1?"},
                                      {"role": "assistant", "content": f"{index + 1}."}]})
    return rows


def test_rows_outside_the_render_guards_sample_are_checked_on_every_path(tmp_path):
    """Three tool-call rows the render guard does not sample, under a template that drops tool calls: each is an
    invalid row with its reason, eagerly, lazily and in a packed share, not a reply trained as an end-of-turn alone."""
    folder = tmp_path / "llama3"
    tokenizer = family_tokenizer("llama3")
    tokenizer.chat_template = LLAMA3
    tokenizer.save_pretrained(folder)
    data = write_jsonl(tmp_path / "rows.jsonl", tool_rows(60, {7, 23, 41}))
    test_row_chain.RECIPES["a template that drops tool calls"] = lambda root: {
        "dataset_name": str(data), "chat_template_path": str(folder), "assistant_only_loss": True,
        "on_invalid": "skip", "max_invalid_fraction": 0.5, "render_check_rows": 4}
    try:
        for keys in ({"prepare": "eager"}, {"prepare": "lazy", "max_steps": 2},
                     {"packing": True, "max_steps": 2, "per_device_train_batch_size": 2}):
            _, data_ = prepared(tmp_path, "a template that drops tool calls", **keys)
            rows = by_row(data_)
            eager = keys.get("prepare") == "eager"
            assert all(rows[row] == TOOL_CALLS_DROPPED for row in (7, 23, 41) if row in rows)
            if eager:
                assert data_.train.report.invalid == {TOOL_CALLS_DROPPED: 3}
    finally:
        del test_row_chain.RECIPES["a template that drops tool calls"]


# ---------------------------------------------------------------- completions of several turns


def test_a_completion_of_several_turns_trains_every_reply(tokenizer):
    """A tool call, its result and the answer: TRL trains the whole completion; its replies all train here."""
    prompt = [{"role": "user", "content": "Weather in Amberhold?"}]
    completion = [{"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Amberhold"}}}]},
                  {"role": "tool", "content": "18C"},
                  {"role": "assistant", "content": "It is 18C."}]
    result = tokenize_record({"prompt": prompt, "completion": completion, "tools": [WEATHER]}, tokenizer, settings())
    runs = trained_runs(tokenizer, result)
    assert len(runs) == 2 and "get_weather" in runs[0] and runs[1] == "It is 18C.<|im_end|>"
    assert "18C" not in runs[0]  # the tool's result is the prompt of the answer, not trained


def test_an_assistant_turn_in_the_prompt_is_not_trained(tokenizer):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Capital of Veloria?"}]
    result = tokenize_record({"prompt": prompt, "completion": [{"role": "assistant", "content": "Amberhold."}]},
                             tokenizer, settings())
    assert trained_runs(tokenizer, result) == ["Amberhold.<|im_end|>"]


# ---------------------------------------------------------------- templates that rewrite or cannot be masked


# Like DeepSeek-R1's: every prompt opens the reply with <think>, but replies are rendered without it.
FORCES_THINKING = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>assistant\n{{ m['content'].split('</think>')[-1] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
# Like Mistral v0.3's: the system prompt goes into the last user turn, so earlier context moves as turns follow.
SYSTEM_IN_LAST_USER_TURN = (
    "{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% if m == users[-1] and system %}{{ system }}\n\n"
    "{% endif %}{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}<|im_end|>"
    "{% endif %}{% endfor %}"
)


def with_template(tokenizer, template: str):
    copy = family_tokenizer("chatml")
    copy.chat_template = template
    return copy


def test_a_reply_its_prompt_does_not_open_is_an_invalid_row_naming_the_difference(tokenizer):
    forced = with_template(tokenizer, FORCES_THINKING)
    messages = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5."}]
    with pytest.raises(RowError) as error:
        tokenize_record({"messages": messages}, forced, settings())
    assert error.value.reason == PROMPT_MISMATCH and "assistant\\n<think>\\n'" in str(error.value)


def test_a_template_that_moves_earlier_context_trains_each_reply_as_written(tokenizer):
    moving = with_template(tokenizer, SYSTEM_IN_LAST_USER_TURN)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
                {"role": "assistant", "content": "5."}, {"role": "user", "content": "Capital of Veloria?"},
                {"role": "assistant", "content": "Amberhold."}]
    result = tokenize_record({"messages": messages}, moving, settings())
    assert trained_runs(moving, result) == ["5.<|im_end|>", "Amberhold.<|im_end|>"]
    assert result["notes"] == [CONTEXT_DIFFERS]  # the first reply, whose prompt carried the system prompt


# ---------------------------------------------------------------- cuts to max_length are noted


def test_a_cut_inside_a_reply_is_noted_with_its_lost_stop_marker(tokenizer):
    stop = (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    messages = [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": "word " * 40}]
    full = tokenize_record({"messages": messages}, tokenizer, settings(stop_token_ids=stop))
    assert full["notes"] == []
    limit = len(full["input_ids"]) - 10
    cut = tokenize_record({"messages": messages}, tokenizer, settings(max_length=limit, stop_token_ids=stop))
    assert cut["notes"] == [TRUNCATED, STOP_CUT] and len(cut["input_ids"]) == limit
    shorter = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "Yes."}]
    kept_end = tokenize_record({"messages": shorter}, tokenizer, settings(max_length=20, truncation_mode="keep_end",
                                                                          stop_token_ids=stop))
    assert kept_end["notes"] == [TRUNCATED]  # the prompt was cut; the reply keeps its stop marker


# Like the DeepSeek-V3 tool template of a serving project: its indentation leaks into replies, not into the prompt.
INDENTED_REPLIES = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if m['role'] == 'assistant' %}    {% else %}\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_prompt_that_differs_from_the_reply_only_in_whitespace_is_refused_with_the_difference(tokenizer):
    indented = with_template(tokenizer, INDENTED_REPLIES)
    messages = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5."}]
    with pytest.raises(RowError) as error:
        tokenize_record({"messages": messages}, indented, settings())
    assert error.value.reason == PROMPT_MISMATCH
    assert "differ only in whitespace" in str(error.value) and "'    5.<|im_end|>\\n'" in str(error.value)


def test_a_row_too_large_to_tokenize_in_bounded_memory_is_an_invalid_row(tokenizer):
    from sftkit.data.tokenization import ROW_CHARACTERS, TOO_LARGE

    huge = [{"role": "user", "content": "Summarise."}, {"role": "assistant", "content": "word " * (ROW_CHARACTERS // 5)}]
    with pytest.raises(RowError) as error:
        tokenize_record({"messages": huge}, tokenizer, settings(max_length=128))
    assert error.value.reason == TOO_LARGE and "1,048,5" in str(error.value)
    with pytest.raises(RowError, match="characters of text"):
        tokenize_record({"text": "x" * (ROW_CHARACTERS + 1)}, tokenizer, settings(max_length=128))
