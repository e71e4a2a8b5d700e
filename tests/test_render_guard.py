"""The render guard stops a run whose chat template drops turns or leaves nothing to train, before step 1."""

from __future__ import annotations

import pytest

from sftkit.data.render_guard import check_rendering
from sftkit.data.rendered import appearance
from sftkit.data.tokenization import TokenizeSettings
from sftkit.errors import SftkitError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of Veloria?"},
    {"role": "assistant", "content": "The capital of Veloria is Amberhold."},
]

# Renders assistant turns only, the way Qwen2.5's template treats roles it does not know.
DROPS_USER_TURNS = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
)
# Trims and re-indents content, and drops the reasoning of all but the last assistant turn (like Qwen3).
TRIMS_AND_DROPS_REASONING = (
    "{% for m in messages %}{% set content = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n  {{ content | trim }}<|im_end|>\n{% endfor %}"
)


SETTINGS = TokenizeSettings(max_length=None, truncate=True, truncation_mode="keep_start", long_rows="truncate",
                            assistant_only_loss=True, completion_only_loss=None, end_of_turn="<|im_end|>",
                            eos_after_replies=False)


def records(*conversations) -> list[tuple[str, dict]]:
    """Rows as the data path hands them to the guard: (the row's name, canonical record)."""
    return [(f"rows.jsonl row {row}", {"messages": conversation}) for row, conversation in enumerate(conversations)]


def test_clean_data_passes(tokenizer):
    assert check_rendering(records(CONVERSATION, CONVERSATION), tokenizer, SETTINGS, "train") == 2


def test_template_that_drops_turns_is_caught(tokenizer):
    original = tokenizer.chat_template
    tokenizer.chat_template = DROPS_USER_TURNS
    try:
        with pytest.raises(SftkitError) as error:
            check_rendering(records(CONVERSATION), tokenizer, SETTINGS, "train")
    finally:
        tokenizer.chat_template = original
    message = str(error.value)
    assert "rows.jsonl row 0: turn 0 (system)" in message
    assert "chat_template_path" in message and "renders rows.jsonl row 0 as" in message  # known roles: another template


def test_unmapped_sharegpt_roles_are_caught_with_qwen25_template(tokenizer):
    # What TRL 1.16 trains on when human/gpt roles reach Qwen2.5's template: the default system prompt only.
    unmapped = [{"role": "human", "content": "What is 2 + 2?"}, {"role": "gpt", "content": "2 + 2 = 4."}]
    with pytest.raises(SftkitError, match="(?s)turn 0 \\(human\\).*missing from the rendering.*role_map"):
        check_rendering(records(unmapped), tokenizer, SETTINGS, "train")


def test_trimming_and_dropped_reasoning_are_not_false_alarms():
    rendered_by = {
        "reasoning": "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\n  Q2<|im_end|>\n<|im_start|>assistant\n<think>r2</think>A2<|im_end|>\n",
    }
    messages = [
        {"role": "user", "content": "  Q1\n"},
        {"role": "assistant", "content": "<think>long reasoning</think>A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>r2</think>A2"},
    ]
    assert appearance(messages, rendered_by["reasoning"]).missing == []


def test_trimming_template_end_to_end(tokenizer):
    original = tokenizer.chat_template
    tokenizer.chat_template = TRIMS_AND_DROPS_REASONING
    conversation = [
        {"role": "user", "content": "  Why?  \n"},
        {"role": "assistant", "content": "<think>because</think>\nSo."},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "Done."},
    ]
    try:
        assert check_rendering(records(conversation), tokenizer, SETTINGS, "train") == 1
    finally:
        tokenizer.chat_template = original


def test_tool_calls_count_as_content():
    messages = [
        {"role": "user", "content": "Weather in Amberhold?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {}}}]},
    ]
    assert appearance(messages, "user: Weather in Amberhold? assistant: <tool_call>get_weather</tool_call>").missing == []
    assert appearance(messages, "user: Weather in Amberhold? assistant:").missing == [1]


def test_render_check_rows_zero_checks_nothing():
    from sftkit.data.render_guard import sample_indices

    assert sample_indices(10, 0) == [] and sample_indices(10, 3) == [0, 3, 6]


@pytest.mark.parametrize("prepare", ["eager", "lazy"])
def test_a_run_whose_template_drops_turns_stops_before_any_row_is_prepared(tmp_path, sharegpt_rows, prepare):
    """The guard in the data path, not only its unit: a recipe whose chat template drops the user's turns is
    refused by the data preparation every run goes through, eager and lazy."""
    from helpers import TINY_MODEL, write_jsonl, write_recipe

    from sftkit.data.preparation import prepare_data
    from sftkit.setup.resolve import load_recipe
    from sftkit.train.model import load_tokenizer

    (tmp_path / "drops_user_turns.jinja").write_text(DROPS_USER_TURNS)
    recipe = load_recipe(str(write_recipe(
        tmp_path / "recipe.yaml", model_name_or_path=TINY_MODEL, output_dir=str(tmp_path / "out"), prepare=prepare,
        dataset_name=str(write_jsonl(tmp_path / "rows.jsonl", sharegpt_rows)), max_steps=1,
        chat_template_path=str(tmp_path / "drops_user_turns.jinja"))))
    with pytest.raises(SftkitError, match="(?s)lose turns in the chat template.*turn 1 \\(user\\).*renders .* row 0"):
        prepare_data(recipe, load_tokenizer(recipe))
