"""The built-in adapters: messages, sharegpt (LLaMA-Factory style), alpaca, prompt_completion, text.

Fixtures are written here; the last tests also run every adapter over LLaMA-Factory's real demo files
(https://github.com/hiyouga/LLaMA-Factory/tree/main/data) where a copy sits beside the checkout, in
shared/data/llamafactory, and say so when they skip.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import pytest
from helpers import ROOT, sharegpt_row

from sftkit import plugins
from sftkit.adapters.alpaca import AlpacaAdapter
from sftkit.adapters.messages import MessagesAdapter
from sftkit.adapters.prompt_completion import PromptCompletionAdapter
from sftkit.adapters.sharegpt import ShareGPTAdapter
from sftkit.adapters.text import TextAdapter
from sftkit.contract import RowError
from sftkit.data.adapt import choose_adapter, resolve_options
from sftkit.errors import SftkitError
from sftkit.testing import convert_rows, detects

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME_TOOL = {"name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {}}}


def wrapped(tool: dict) -> dict:
    return {"type": "function", "function": tool}


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def convert_one(adapter, row, options=None) -> dict:
    return convert_rows(adapter, [row], options)[0]


def rejects(adapter, row, options=None) -> RowError:
    with pytest.raises(RowError) as error:
        convert_rows(adapter, [row], options)
    return error.value


# ----------------------------------------------------------------------------------------------- messages


def test_messages_plain_conversation_and_extra_columns_ignored():
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ],
        "label": True,
    }
    assert convert_one(MessagesAdapter(), row) == {"messages": row["messages"]}


def test_messages_openai_tool_calls_with_string_arguments_become_dicts():
    row = {
        "messages": [
            {"role": "user", "content": "Weather in Paris and the time?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": {}}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "18C"},
            {"role": "tool", "tool_call_id": "c2", "name": "clock", "content": "12:00"},
            {"role": "assistant", "content": "18C and noon."},
        ],
        "tools": [WEATHER_TOOL, wrapped(TIME_TOOL)],
    }
    record = convert_one(MessagesAdapter(), row)
    assert record["messages"][1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{**call("get_weather", city="Paris"), "id": "c1"}, {**call("get_time"), "id": "c2"}],
    }
    # tool turns keep their name and the id of the call they answer (which Mistral's templates read), or get the name
    # of the call they answer
    assert record["messages"][2] == {"role": "tool", "content": "18C", "tool_call_id": "c1", "name": "get_weather"}
    assert record["messages"][3] == {"role": "tool", "content": "12:00", "tool_call_id": "c2", "name": "clock"}
    assert record["tools"] == [wrapped(WEATHER_TOOL), wrapped(TIME_TOOL)]


@pytest.mark.parametrize("tools", [json.dumps([WEATHER_TOOL]), [WEATHER_TOOL], WEATHER_TOOL, [wrapped(WEATHER_TOOL)]])
def test_messages_tools_as_list_json_string_or_single_definition(tools):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": tools}
    assert convert_one(MessagesAdapter(), row)["tools"] == [wrapped(WEATHER_TOOL)]


@pytest.mark.parametrize("tools", ["", "[]", "  ", [], None, "missing"])
def test_messages_empty_tools_are_omitted(tools):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    if tools != "missing":
        row["tools"] = tools
    assert "tools" not in convert_one(MessagesAdapter(), row)


def test_messages_options_column_names_and_role_map():
    row = {
        "conversations": [{"role": "human", "content": "a"}, {"role": "bot", "content": "b"}],
        "functions": json.dumps([TIME_TOOL]),
    }
    options = {
        "messages_column": "conversations",
        "role_map": {"human": "user", "bot": "assistant"},
        "tools_column": "functions",
    }
    record = convert_one(MessagesAdapter(), row, options)
    assert [message["role"] for message in record["messages"]] == ["user", "assistant"]
    assert record["tools"] == [wrapped(TIME_TOOL)]
    columns = MessagesAdapter().columns(resolve_options(MessagesAdapter(), {**options}))
    assert columns.all == ("conversations", "functions")


def test_messages_tools_column_null_reads_no_tools():
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": "{bad"}
    options = {"tools_column": None}
    assert "tools" not in convert_one(MessagesAdapter(), row, options)
    columns = MessagesAdapter().columns(resolve_options(MessagesAdapter(), {"tools_column": None}))
    assert columns.all == ("messages",)


def test_messages_unknown_role_names_turn_role_and_option():
    error = rejects(
        MessagesAdapter(), {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}
    )
    assert error.reason == "unknown role"
    assert (
        "turn 1" in str(error) and "'bot'" in str(error) and "role_map: {bot: user|assistant|system|tool}" in str(error)
    )


def test_messages_unknown_option_is_an_error():
    with pytest.raises(
        SftkitError, match="'messages' has no option 'role_mapping'.*accepted: messages_column, role_map"
    ):
        convert_rows(MessagesAdapter(), [], {"role_mapping": {}})


# ----------------------------------------------------------------------------------------------- sharegpt


def glaive_row(*turns, tools="") -> dict:
    return {"conversations": [{"from": speaker, "value": value} for speaker, value in turns], "tools": tools}


def test_sharegpt_glaive_function_call_and_observation():
    row = glaive_row(
        ("human", "Weather in Paris?"),
        ("function_call", json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})),
        ("observation", '{"temperature": 18}'),
        ("gpt", "It is 18C."),
        tools=json.dumps([WEATHER_TOOL]),
    )
    assert convert_one(ShareGPTAdapter(), row) == {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris")]},
            {"role": "tool", "content": '{"temperature": 18}', "name": "get_weather"},
            {"role": "assistant", "content": "It is 18C."},
        ],
        "tools": [wrapped(WEATHER_TOOL)],
    }


@pytest.mark.parametrize("tools", ["", "[]", None, []])
def test_sharegpt_rows_without_tools_omit_them(tools):
    row = glaive_row(("human", "hi"), ("gpt", "hello"), tools=tools)
    assert convert_one(ShareGPTAdapter(), row) == {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }


def test_sharegpt_function_call_list_string_arguments_and_tools_as_list():
    value = json.dumps(
        [{"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}, {"name": "get_time", "arguments": {}}]
    )
    row = glaive_row(
        ("human", "Weather and time in Oslo?"),
        ("function_call", value),
        ("observation", "5C"),
        ("observation", "09:00"),
        ("gpt", "5C at nine."),
        tools=[WEATHER_TOOL, TIME_TOOL],
    )
    record = convert_one(ShareGPTAdapter(), row)
    assert record["messages"][1]["tool_calls"] == [call("get_weather", city="Oslo"), call("get_time")]
    assert [message.get("name") for message in record["messages"][2:4]] == ["get_weather", "get_time"]
    assert record["tools"] == [wrapped(WEATHER_TOOL), wrapped(TIME_TOOL)]


def test_sharegpt_function_call_after_gpt_turn_is_a_new_assistant_turn_and_consecutive_calls_merge():
    row = glaive_row(
        ("human", "Weather and time?"),
        ("gpt", "Let me check."),
        ("function_call", json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})),
        ("function_call", json.dumps({"name": "get_time", "arguments": {}})),
        ("observation", "20C"),
        ("observation", "10:00"),
        ("gpt", "20C at ten."),
    )
    messages = convert_one(ShareGPTAdapter(), row)["messages"]
    assert messages[1] == {"role": "assistant", "content": "Let me check."}
    assert messages[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [call("get_weather", city="Rome"), call("get_time")],
    }
    assert [message["role"] for message in messages] == ["user", "assistant", "assistant", "tool", "tool", "assistant"]


def test_sharegpt_system_column_is_the_system_prompt():
    row = {**glaive_row(("human", "hi"), ("gpt", "hello")), "system": "Be kind."}
    assert convert_one(ShareGPTAdapter(), row)["messages"][0] == {"role": "system", "content": "Be kind."}
    row["system"] = ""
    assert convert_one(ShareGPTAdapter(), row)["messages"][0]["role"] == "user"


def test_sharegpt_system_column_and_system_turn_conflict_unless_column_ignored():
    row = {**glaive_row(("system", "A"), ("human", "hi"), ("gpt", "hello")), "system": "B"}
    error = rejects(ShareGPTAdapter(), row)
    assert "system_column: null" in str(error)
    messages = convert_one(ShareGPTAdapter(), row, {"system_column": None})["messages"]
    assert messages[0] == {"role": "system", "content": "A"}


def test_sharegpt_llamafactory_tags_as_options():
    """LLaMA-Factory's kto demo: sharegpt formatting with role_tag role, content_tag content, column messages."""
    row = {
        "dialog": [{"speaker": "customer", "text": "hi"}, {"speaker": "agent", "text": "hello"}],
        "sys": "S",
        "functions": json.dumps([TIME_TOOL]),
    }
    options = {
        "messages_column": "dialog",
        "role_key": "speaker",
        "content_key": "text",
        "role_map": {"customer": "user", "agent": "assistant"},
        "system_column": "sys",
        "tools_column": "functions",
    }
    assert convert_one(ShareGPTAdapter(), row, options) == {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ],
        "tools": [wrapped(TIME_TOOL)],
    }
    assert ShareGPTAdapter().columns(resolve_options(ShareGPTAdapter(), options)).all == ("dialog", "sys", "functions")


def test_sharegpt_role_map_can_name_a_function_call_speaker():
    row = glaive_row(
        ("human", "time?"),
        ("tool_use", json.dumps({"name": "get_time", "arguments": {}})),
        ("tool_result", "12:00"),
        ("gpt", "Noon."),
    )
    messages = convert_one(ShareGPTAdapter(), row, {"role_map": {"tool_use": "function_call", "tool_result": "tool"}})[
        "messages"
    ]
    assert messages[1]["tool_calls"] == [call("get_time")]
    assert messages[2] == {"role": "tool", "content": "12:00", "name": "get_time"}


def test_sharegpt_defaults_stay_compatible():
    options = dataclasses.asdict(resolve_options(ShareGPTAdapter(), {}))
    assert (options["messages_column"], options["role_key"], options["content_key"]) == (
        "conversations",
        "from",
        "value",
    )
    assert {"human": "user", "gpt": "assistant", "system": "system"}.items() <= options["role_map"].items()


def test_sharegpt_unknown_role_names_turn_speaker_and_option():
    error = rejects(ShareGPTAdapter(), glaive_row(("human", "hi"), ("robot", "x")))
    assert error.reason == "unknown role"
    message = str(error)
    assert "turn 1" in message and "'robot'" in message
    assert "dataset_options: {role_map: {robot: user|assistant|system|tool|function_call}}" in message


# ----------------------------------------------------------------------------------------------- alpaca


def test_alpaca_instruction_and_input_joined_with_newline():
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert convert_one(AlpacaAdapter(), row) == {
        "messages": [
            {"role": "user", "content": "Translate to French.\nGood morning"},
            {"role": "assistant", "content": "Bonjour"},
        ]
    }


@pytest.mark.parametrize("empty_input", ["", None, "missing"])
def test_alpaca_without_input(empty_input):
    row = {"instruction": "Say hi.", "output": "Hi!"}
    if empty_input != "missing":
        row["input"] = empty_input
    assert convert_one(AlpacaAdapter(), row)["messages"][0] == {"role": "user", "content": "Say hi."}


def test_alpaca_system_and_history_come_first():
    row = {
        "instruction": "And 2 + 2?",
        "input": "",
        "output": "4",
        "system": "You do arithmetic.",
        "history": [["1 + 1?", "2"], ["2 + 1?", "3"]],
    }
    assert convert_one(AlpacaAdapter(), row)["messages"] == [
        {"role": "system", "content": "You do arithmetic."},
        {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2 + 1?"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_alpaca_column_options():
    row = {"q": "Capital of Peru?", "ctx": "one word", "a": "Lima", "sys": "Geo.", "past": [["hi", "hello"]]}
    options = {
        "instruction_column": "q",
        "input_column": "ctx",
        "output_column": "a",
        "system_column": "sys",
        "history_column": "past",
    }
    messages = convert_one(AlpacaAdapter(), row, options)["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "Capital of Peru?\none word" and messages[4]["content"] == "Lima"
    assert AlpacaAdapter().columns(resolve_options(AlpacaAdapter(), options)).all == ("q", "a", "ctx", "sys", "past")
    no_optional = {**options, "input_column": None, "system_column": None, "history_column": None}
    assert AlpacaAdapter().columns(resolve_options(AlpacaAdapter(), no_optional)).all == ("q", "a")
    assert len(convert_one(AlpacaAdapter(), row, no_optional)["messages"]) == 2


@pytest.mark.parametrize("column", ["instruction", "output"])
@pytest.mark.parametrize("value", ["", "   ", None])
def test_alpaca_empty_instruction_or_output_is_empty_content(column, value):
    row = {"instruction": "Do it.", "input": "", "output": "Done.", column: value}
    error = rejects(AlpacaAdapter(), row)
    assert error.reason == "empty content" and repr(column) in str(error)


# ----------------------------------------------------------------------------------------------- prompt / completion


def test_prompt_completion_text():
    row = {"prompt": "The sky is", "completion": " blue."}
    assert convert_one(PromptCompletionAdapter(), row) == row


def test_prompt_completion_message_lists_with_tool_calls():
    row = {
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "time?"}],
        "completion": [
            {"role": "assistant", "content": "", "tool_calls": [{"name": "get_time", "arguments": "{}"}]},
            {"role": "tool", "content": "12:00"},
            {"role": "assistant", "content": "Noon."},
        ],
    }
    record = convert_one(PromptCompletionAdapter(), row)
    assert record["prompt"] == row["prompt"]
    assert record["completion"][0]["tool_calls"] == [call("get_time")]
    assert record["completion"][1] == {"role": "tool", "content": "12:00", "name": "get_time"}


def test_prompt_completion_column_options_and_role_map():
    row = {"question": [{"role": "human", "content": "hi"}], "answer": [{"role": "bot", "content": "hello"}]}
    options = {
        "prompt_column": "question",
        "completion_column": "answer",
        "role_map": {"human": "user", "bot": "assistant"},
    }
    record = convert_one(PromptCompletionAdapter(), row, options)
    assert record == {
        "prompt": [{"role": "user", "content": "hi"}],
        "completion": [{"role": "assistant", "content": "hello"}],
    }
    columns = PromptCompletionAdapter().columns(resolve_options(PromptCompletionAdapter(), options))
    assert columns.all == ("question", "answer")


def test_prompt_completion_unknown_role_in_message_list():
    row = {"prompt": [{"role": "robot", "content": "hi"}], "completion": [{"role": "assistant", "content": "x"}]}
    error = rejects(PromptCompletionAdapter(), row)
    assert error.reason == "unknown role" and "prompt turn 0" in str(error) and "role_map" in str(error)


def test_prompt_completion_mixed_text_and_messages_is_rejected():
    row = {"prompt": "hi", "completion": [{"role": "assistant", "content": "x"}]}
    error = rejects(PromptCompletionAdapter(), row)
    assert error.reason == "rejected by adapter" and "both be text or both" in str(error)


# ----------------------------------------------------------------------------------------------- text


def test_text_and_text_column_option():
    assert convert_one(TextAdapter(), {"text": "Once upon a time.", "url": "x"}) == {"text": "Once upon a time."}
    assert convert_one(TextAdapter(), {"body": "B"}, {"text_column": "body"}) == {"text": "B"}
    assert TextAdapter().columns(resolve_options(TextAdapter(), {"text_column": "body"})).all == ("body",)


# ----------------------------------------------------------------------------------------------- every RowError reason

MESSAGES_OK = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


def assistant_calling(tool_calls) -> list[dict]:
    return [{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": tool_calls}]


REJECTIONS = [
    # messages
    (
        "messages",
        MessagesAdapter(),
        {"messages": [{"role": "narrator", "content": "x"}]},
        None,
        "unknown role",
        "role_map",
    ),
    (
        "messages-tools-json",
        MessagesAdapter(),
        {"messages": MESSAGES_OK, "tools": "[{bad"},
        None,
        "malformed tool call",
        "'tools'",
    ),
    (
        "messages-tools-type",
        MessagesAdapter(),
        {"messages": MESSAGES_OK, "tools": 3},
        None,
        "malformed tool call",
        "'tools'",
    ),
    (
        "messages-tool-no-name",
        MessagesAdapter(),
        {"messages": MESSAGES_OK, "tools": [{"description": "d"}]},
        None,
        "malformed tool call",
        "tool 0",
    ),
    (
        "messages-args-json",
        MessagesAdapter(),
        {"messages": assistant_calling([{"function": {"name": "f", "arguments": "{x"}}])},
        None,
        "malformed tool call",
        "turn 1",
    ),
    (
        "messages-args-list",
        MessagesAdapter(),
        {"messages": assistant_calling([{"name": "f", "arguments": [1]}])},
        None,
        "malformed tool call",
        "JSON object",
    ),
    (
        "messages-call-no-name",
        MessagesAdapter(),
        {"messages": assistant_calling([{"arguments": {}}])},
        None,
        "malformed tool call",
        "name",
    ),
    (
        "messages-call-type",
        MessagesAdapter(),
        {"messages": assistant_calling(["f()"])},
        None,
        "malformed tool call",
        "turn 1",
    ),
    (
        "messages-user-calls",
        MessagesAdapter(),
        {"messages": [{"role": "user", "content": "", "tool_calls": [{"name": "f"}]}]},
        None,
        "malformed tool call",
        "only assistant",
    ),
    ("messages-not-list", MessagesAdapter(), {"messages": "hi"}, None, "rejected by adapter", "non-empty list"),
    (
        "messages-no-content",
        MessagesAdapter(),
        {"messages": [{"role": "user", "content": 3}]},
        None,
        "rejected by adapter",
        "text 'content'",
    ),
    ("messages-turn-type", MessagesAdapter(), {"messages": ["hi"]}, None, "rejected by adapter", "turn 0"),
    # sharegpt
    ("sharegpt-role", ShareGPTAdapter(), glaive_row(("human", "a"), ("bot", "b")), None, "unknown role", "role_map"),
    (
        "sharegpt-call-json",
        ShareGPTAdapter(),
        glaive_row(("human", "a"), ("function_call", "{name: f}")),
        None,
        "malformed tool call",
        "turn 1 (function_call)",
    ),
    (
        "sharegpt-call-no-name",
        ShareGPTAdapter(),
        glaive_row(("human", "a"), ("function_call", '{"arguments": {}}')),
        None,
        "malformed tool call",
        "name",
    ),
    (
        "sharegpt-call-empty",
        ShareGPTAdapter(),
        glaive_row(("human", "a"), ("function_call", "[]")),
        None,
        "malformed tool call",
        "non-empty list",
    ),
    (
        "sharegpt-call-args",
        ShareGPTAdapter(),
        glaive_row(("human", "a"), ("function_call", '{"name": "f", "arguments": "{oops"}')),
        None,
        "malformed tool call",
        "arguments",
    ),
    (
        "sharegpt-tools-json",
        ShareGPTAdapter(),
        glaive_row(("human", "a"), ("gpt", "b"), tools="[{"),
        None,
        "malformed tool call",
        "'tools'",
    ),
    (
        "sharegpt-value-type",
        ShareGPTAdapter(),
        glaive_row(("human", 3), ("gpt", "b")),
        None,
        "rejected by adapter",
        "non-text",
    ),
    (
        "sharegpt-turn-keys",
        ShareGPTAdapter(),
        {"conversations": [{"role": "user", "content": "a"}]},
        None,
        "rejected by adapter",
        "'from' and 'value'",
    ),
    ("sharegpt-empty", ShareGPTAdapter(), {"conversations": []}, None, "rejected by adapter", "non-empty list"),
    (
        "sharegpt-system-type",
        ShareGPTAdapter(),
        {**glaive_row(("human", "a"), ("gpt", "b")), "system": ["x"]},
        None,
        "rejected by adapter",
        "'system'",
    ),
    # alpaca
    (
        "alpaca-empty-instruction",
        AlpacaAdapter(),
        {"instruction": "", "output": "b"},
        None,
        "empty content",
        "instruction_column",
    ),
    (
        "alpaca-empty-output",
        AlpacaAdapter(),
        {"instruction": "a", "output": " "},
        None,
        "empty content",
        "output_column",
    ),
    (
        "alpaca-output-type",
        AlpacaAdapter(),
        {"instruction": "a", "output": 3},
        None,
        "rejected by adapter",
        "must be text",
    ),
    (
        "alpaca-input-type",
        AlpacaAdapter(),
        {"instruction": "a", "input": ["x"], "output": "b"},
        None,
        "rejected by adapter",
        "'input'",
    ),
    (
        "alpaca-history-type",
        AlpacaAdapter(),
        {"instruction": "a", "output": "b", "history": "x"},
        None,
        "rejected by adapter",
        "pairs",
    ),
    (
        "alpaca-history-pair",
        AlpacaAdapter(),
        {"instruction": "a", "output": "b", "history": [["x"]]},
        None,
        "rejected by adapter",
        "history entry 0",
    ),
    # prompt_completion
    (
        "pc-role",
        PromptCompletionAdapter(),
        {"prompt": [{"role": "me", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]},
        None,
        "unknown role",
        "role_map",
    ),
    (
        "pc-call",
        PromptCompletionAdapter(),
        {
            "prompt": [{"role": "user", "content": "a"}],
            "completion": assistant_calling([{"name": "f", "arguments": "{"}])[1:],
        },
        None,
        "malformed tool call",
        "completion turn 0",
    ),
    (
        "pc-empty-completion",
        PromptCompletionAdapter(),
        {"prompt": "a", "completion": ""},
        None,
        "empty content",
        "'completion'",
    ),
    (
        "pc-empty-list",
        PromptCompletionAdapter(),
        {"prompt": [], "completion": [{"role": "assistant", "content": "b"}]},
        None,
        "empty content",
        "'prompt'",
    ),
    (
        "pc-type",
        PromptCompletionAdapter(),
        {"prompt": 1, "completion": "b"},
        None,
        "rejected by adapter",
        "text or a list",
    ),
    (
        "pc-mixed",
        PromptCompletionAdapter(),
        {"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]},
        None,
        "rejected by adapter",
        "both",
    ),
    # text
    ("text-empty", TextAdapter(), {"text": "  "}, None, "empty content", "'text'"),
    ("text-type", TextAdapter(), {"text": 5}, None, "rejected by adapter", "must be text"),
]


@pytest.mark.parametrize(
    ("adapter", "row", "options", "reason", "fragment"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_row_errors_have_their_reason_and_say_where(adapter, row, options, reason, fragment):
    error = rejects(adapter, row, options)
    assert error.reason == reason
    assert fragment in str(error)


@pytest.mark.parametrize(("adapter", "row", "missing"), [
    (MessagesAdapter(), {"conversations": MESSAGES_OK}, "'messages'"),
    (AlpacaAdapter(), {"instruction": "a", "response": "b"}, "'output'"),
    (PromptCompletionAdapter(), {"prompt": "a"}, "'completion'"),
    (TextAdapter(), {"body": "x"}, "'text'"),
])
def test_a_missing_required_column_is_an_error_not_a_bad_row(adapter, row, missing):
    with pytest.raises(SftkitError, match=f"adapter {adapter.name!r} needs column\\(s\\) {missing}, which the row lacks"):
        convert_rows(adapter, [row])


@pytest.mark.parametrize(
    "adapter", [AlpacaAdapter(), MessagesAdapter(), PromptCompletionAdapter(), ShareGPTAdapter(), TextAdapter()]
)
def test_unknown_option_is_an_error_for_every_adapter(adapter):
    """And a value of the wrong type is one too, before any row."""
    key = next(iter(resolve_options(adapter, {}).__dataclass_fields__))
    with pytest.raises(SftkitError, match=f"dataset_options: {key} of adapter {adapter.name!r} must be"):
        convert_rows(adapter, [], {key: 12})
    with pytest.raises(SftkitError, match=f"adapter {adapter.name!r} has no option 'nope' \\(accepted: "):
        convert_rows(adapter, [], {"nope": 1})


@pytest.mark.parametrize("adapter, role_map", [(MessagesAdapter(), {"a": "robot"}), (ShareGPTAdapter(), {"bot": "robot"}),
                                               (PromptCompletionAdapter(), {"a": "robot"})])
def test_a_bad_role_map_is_one_configuration_error_before_any_row(adapter, role_map):
    with pytest.raises(SftkitError, match=f"dataset_options of adapter {adapter.name!r}: role_map maps .* to 'robot'"):
        convert_rows(adapter, [], {"role_map": role_map})


# ----------------------------------------------------------------------------------------------- detection

SHAPES = {
    "messages": [{"messages": MESSAGES_OK, "label": True}, {"messages": MESSAGES_OK, "label": False}],
    "sharegpt": [
        glaive_row(("human", "a"), ("gpt", "b"), tools=""),
        glaive_row(
            ("human", "a"),
            ("function_call", '{"name": "f", "arguments": {}}'),
            ("observation", "x"),
            ("gpt", "b"),
            tools="[]",
        ),
    ],
    "alpaca": [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}],
    "prompt_completion": [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}],
    "prompt_completion-messages": [
        {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}
    ],
    "text": [{"text": "a", "url": "u"}, {"text": "b", "url": "v"}],
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_auto_detection_picks_exactly_one_builtin(shape):
    rows = SHAPES[shape]
    installed, reason, _ = choose_adapter("auto", datasets.Dataset.from_list(rows), plugins.registry())
    expected = shape.split("-")[0]
    assert installed.adapter.name == expected and reason.startswith(f"dataset_format auto: {expected} (")
    convert_rows(installed.adapter, rows)


@pytest.mark.parametrize(
    ("adapter", "rows"),
    [
        (MessagesAdapter(), [{"messages": [{"from": "human", "value": "a"}]}]),  # sharegpt turns under 'messages'
        (ShareGPTAdapter(), [{"conversations": MESSAGES_OK}]),  # role/content turns under 'conversations'
        (AlpacaAdapter(), [{"instruction": "a", "context": "", "response": "b"}]),  # Dolly, not Alpaca
        (PromptCompletionAdapter(), [{"prompt": "a", "chosen": "b", "rejected": "c"}]),  # preference data
        (TextAdapter(), [{"text": "a", "prompt": "p", "completion": "c"}]),
        (TextAdapter(), [{"text": "a", "messages": MESSAGES_OK}]),
        (TextAdapter(), [{"text": "a", "instruction": "i", "output": "o"}]),
        (TextAdapter(), [{"text": "a", "conversations": []}]),
    ],
)
def test_detection_declines_other_shapes(adapter, rows):
    assert detects(adapter, rows) is None


@pytest.mark.parametrize(("column", "turns", "expected"), [
    ("conversations", MESSAGES_OK, "messages"),  # role/content turns under the name ShareGPT data uses
    ("dialog", MESSAGES_OK, "messages"),
    ("chat", [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "sharegpt"),
])
def test_a_list_of_turns_is_recognised_by_its_shape_whatever_the_column(column, turns, expected):
    rows = [{"id": 1, column: turns}]
    installed, reason, options = choose_adapter("auto", datasets.Dataset.from_list(rows), plugins.registry())
    assert installed.adapter.name == expected and options == {"messages_column": column}
    assert f"column {column!r} holds" in reason
    record = convert_rows(installed.adapter, rows, options)[0]
    assert [message["role"] for message in record["messages"]] == ["user", "assistant"]


def test_well_known_speakers_are_read_in_any_case_and_the_log_says_so():
    rows = [sharegpt_row(0, ("Human", "2 + 2?"), ("GPT", "4.")), sharegpt_row(1, ("USER", "hi"), ("Assistant", "hey"))]
    installed, reason, _ = choose_adapter("auto", datasets.Dataset.from_list(rows), plugins.registry())
    assert "speakers read by their well-known names: Assistant -> assistant, GPT -> assistant, Human -> user, " \
           "USER -> user" in reason
    records = convert_rows(installed.adapter, rows)
    assert [[m["role"] for m in record["messages"]] for record in records] == [["user", "assistant"]] * 2
    turns = [{"role": "Human", "content": "hi"}, {"role": "BOT", "content": "x"}]  # BOT is nobody's well-known name
    assert rejects(MessagesAdapter(), {"messages": turns}).reason == "unknown role"


def test_detection_reasons_name_what_was_seen():
    assert "conversations" in detects(ShareGPTAdapter(), SHAPES["sharegpt"])
    assert "{from, value}" in detects(ShareGPTAdapter(), SHAPES["sharegpt"])
    assert "{role, content}" in detects(MessagesAdapter(), SHAPES["messages"])
    assert "instruction and output" in detects(AlpacaAdapter(), SHAPES["alpaca"])
    assert "prompt and completion" in detects(PromptCompletionAdapter(), SHAPES["prompt_completion"])
    assert "text" in detects(TextAdapter(), SHAPES["text"])


def test_all_builtins_are_registered():
    assert set(plugins.registry().adapters) >= {"alpaca", "messages", "prompt_completion", "sharegpt", "text"}
    for name in ("alpaca", "messages", "prompt_completion", "sharegpt", "text"):
        assert plugins.registry().adapters[name].distribution == "sftkit"


# ----------------------------------------------------------------------------------------------- real data

REAL_FILES = {
    "alpaca_en_demo.json": "alpaca",
    "alpaca_zh_demo.json": "alpaca",
    "identity.json": "alpaca",
    "glaive_toolcall_en_demo.json": "sharegpt",
    "glaive_toolcall_zh_demo.json": "sharegpt",
    "kto_en_demo.json": "messages",
    "c4_demo.jsonl": "text",
}


def _read(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture
def llamafactory_data() -> Path:
    """LLaMA-Factory's demo datasets, where a copy sits beside the checkout; the test skips, saying so, elsewhere."""
    folder = ROOT.parent / "shared" / "data" / "llamafactory"
    if not folder.is_dir():
        pytest.skip(f"LLaMA-Factory's demo datasets are not at {folder} (copy its data/ folder there to run this)")
    return folder


@pytest.mark.parametrize("file_name", sorted(REAL_FILES))
def test_llamafactory_demo_files_convert_with_the_auto_chosen_adapter(file_name, llamafactory_data):
    rows = _read(llamafactory_data / file_name)
    assert rows
    installed, _, _ = choose_adapter("auto", datasets.Dataset.from_list(rows), plugins.registry())
    assert installed.adapter.name == REAL_FILES[file_name]
    records = convert_rows(installed.adapter, rows)  # raises on the first row that does not convert
    assert len(records) == len(rows)
    if file_name.startswith("glaive"):
        calls = [m for record in records for m in record["messages"] if m.get("tool_calls")]
        assert calls and all(isinstance(c["function"]["arguments"], dict) for m in calls for c in m["tool_calls"])
        assert any("tools" in record for record in records) and any("tools" not in record for record in records)
