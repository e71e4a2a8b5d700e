"""``sftkit check``: everything training would do before its first step, printed, without loading weights.

For the rows it shows, it also proves that training sees what inference will send: the prompt part of each
trained conversation is, token for token, what the saved tokenizer's ``apply_chat_template(...,
add_generation_prompt=True)`` gives, and generation stops at the end-of-turn token that was trained.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from transformers import GenerationConfig, PreTrainedTokenizerBase

from sftkit.contract import RowError, is_conversation, record_shape
from sftkit.data.account import account_lines
from sftkit.data.bad_rows import enforce
from sftkit.data.preparation import prepare_data
from sftkit.data.prepared import Preparation, PreparedData, PreparedSplit
from sftkit.data.templates import as_templates_read, rendering_tokenizer, reply_end, tools_of
from sftkit.data.tokenization import IGNORE
from sftkit.outputs.trackers import check_trackers
from sftkit.recipe import Recipe
from sftkit.setup.preflight import check_hub, check_model, check_output_dir
from sftkit.train.model import load_tokenizer, model_path, stop_on_end_of_turn

TRAINED_COLOUR, RESET = "\x1b[1;32m", "\x1b[0m"
PLAIN_MARKS = ("[[", "]]")


def mark_trained(input_ids: list[int], labels: list[int], tokenizer: PreTrainedTokenizerBase, colour: bool) -> str:
    """The tokens as text, the trained ones in green (or between [[ and ]])."""
    opening, closing = (TRAINED_COLOUR, RESET) if colour else PLAIN_MARKS
    pieces, start = [], 0
    for end in range(1, len(input_ids) + 1):
        boundary = end == len(input_ids) or (labels[end] != IGNORE) != (labels[start] != IGNORE)
        if boundary:
            text = tokenizer.decode(input_ids[start:end])
            pieces.append(f"{opening}{text}{closing}" if labels[start] != IGNORE else text)
            start = end
    return "".join(pieces)


def _lengths(split: PreparedSplit, max_length: int | None) -> str:
    lengths = np.array([length for length in split.rows["length"] if length > 0])  # every row that tokenized
    if not len(lengths):
        return f"{split.name}: no valid rows"
    p50, p90, p99 = (int(value) for value in np.percentile(lengths, [50, 90, 99]))
    line = f"{split.name}: p50 {p50}, p90 {p90}, p99 {p99}, max {lengths.max()} tokens over {len(lengths):,} rows"
    if max_length is not None:
        line += f"; {int((lengths > max_length).sum()):,} rows longer than max_length {max_length}"
    return line


def inference_prompt(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[int] | None:
    """The tokens inference sends for the prompt of the record's last trained turn; None for plain text."""
    shape = record_shape(record)
    if shape == "messages":
        messages = record["messages"]
        last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
        prompt = messages[:last]
    elif shape == "prompt_completion":
        prompt = record["prompt"]
        if isinstance(prompt, str):
            return tokenizer(prompt)["input_ids"]  # with the tokenizer's special tokens, as generation encodes text
    else:
        return None
    if not prompt:
        return None  # a conversation that starts with the reply: inference sends the template's own opening
    return list(tokenizer.apply_chat_template(as_templates_read(prompt), tools=tools_of(record),
                                              add_generation_prompt=True, tokenize=True, return_dict=False))


def _same_as_inference(example: dict[str, Any], record: dict[str, Any],
                       tokenizer: PreTrainedTokenizerBase) -> str | None:
    """None when the training row starts with exactly the tokens inference sends for its prompt; else both."""
    sent = inference_prompt(record, tokenizer)
    if sent is None:
        return None
    trained = example["input_ids"][: len(sent)]
    if trained == sent or len(example["input_ids"]) < len(sent):  # a row cut at max_length: nothing to compare
        return None
    return (f"training renders the prompt as:\n{tokenizer.decode(trained)!r}\n"
            f"inference (apply_chat_template with add_generation_prompt) sends:\n{tokenizer.decode(sent)!r}")


def _stops(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, conversational: bool) -> str:
    """What generation stops at once the run has saved its generation config, against what was trained."""
    trained, appended, _ = reply_end(rendering_tokenizer(tokenizer)[0]) if conversational else (None, False, None)
    try:
        config = GenerationConfig.from_pretrained(model_path(recipe))
    except OSError:  # a model without a generation config: transformers derives it from the model config
        config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    stop_on_end_of_turn(config, tokenizer)
    ends = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    names = [tokenizer.convert_ids_to_tokens(token) for token in ends if token is not None]
    if trained is None:
        return f"generation stops at {', '.join(map(repr, names))}"
    ok = trained in names
    how = "the EOS sftkit appends to each reply" if appended else "the token that ends each reply"
    return (f"generation stops at {', '.join(map(repr, names))}: {how}, {trained!r}, is trained"
            + ("" if ok else ", but generation would not stop at it"))


def _conversational(data: PreparedData) -> bool:
    """Whether the rows are conversations (rendered by the chat template), judged by the first valid train row."""
    for position, reason in enumerate(data.train.rows["invalid"]):
        if reason is None:
            return is_conversation(data.train.record(position))
    return False


def check(recipe: Recipe, shown_rows: int, colour: bool) -> None:
    """Describe what would train, then raise SftkitError if the run could not start (preflight) or the bad-row policy
    would stop it. Trackers, the Hub and the model are checked first, as training checks them before any data;
    output_dir last, after the data it would train is described."""
    check_trackers(recipe.training)
    check_hub(recipe.training)
    config = check_model(recipe)
    tokenizer = load_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer, enforce_policy=False)
    splits = data.splits
    lines = [f"recipe         {recipe.path}"]
    lines += [f"note           {note}" for note in recipe.notes]
    for choice in data.plan.adapters:
        installed = choice.installed
        lines.append(f"adapter        {installed.adapter.name} from {installed.distribution} {installed.version} "
                     f"for {choice.source_name}: {choice.reason}")
    covered = "the run's first rows" if data.mode == Preparation.STREAMED else "a sample spread over all rows"
    sample = f"; the train counts below cover {covered}" if data.train.on_demand is not None else ""
    lines.append(f"preparation    {data.preparation}{sample}")
    rows = [line for split in splits for line in split.report.lines()]
    lines += [f"{'rows' if index == 0 else '':<15}{line}" for index, line in enumerate(rows)]
    lines.append(f"eval           {data.plan.eval_origin}")
    lines += [f"{'sources' if index == 0 else '':<15}{line}" for index, line in enumerate(account_lines(data.accounts))]
    lengths = [_lengths(split, recipe.training.max_length) for split in splits]
    lines += [f"{'lengths' if index == 0 else '':<15}{line}" for index, line in enumerate(lengths)]
    if recipe.training.max_length is not None:
        cut = "skipped as too long" if recipe.sftkit.long_rows == "skip" else "truncated"
        lines.append(f"{'':<15}rows longer than max_length are {cut} (long_rows)")
    conversational = _conversational(data)
    if not conversational:
        rendered = "nothing to render (the data is not conversational)"
    elif data.rendered:
        rendered = f"{data.rendered} sampled conversations render every turn"
    else:
        rendered = "checked when these rows were prepared (loaded from the cache)"
    lines.append(f"render guard   {rendered}")
    lines.append(f"stop           {_stops(recipe, tokenizer, conversational)}")
    lines += _shown_rows(data, tokenizer, shown_rows, colour)
    print("\n".join(lines), flush=True)
    check_output_dir(recipe, config)
    for split in splits:
        enforce(split.report, recipe.sftkit.on_invalid, recipe.sftkit.max_invalid_fraction)
    print("\ntraining would start: ok")


def _shown_rows(data: PreparedData, tokenizer: PreTrainedTokenizerBase, count: int, colour: bool) -> list[str]:
    """The first valid train rows with their trained tokens marked, each proved against what inference sends."""
    lines, marks = [], "green" if colour else "between [[ and ]]"
    valid = [row for row, reason in enumerate(data.train.rows["invalid"]) if reason is None]
    for position in valid[:count]:
        example = data.train.rows[position]
        trained = sum(label != IGNORE for label in example["labels"][1:])
        noted = "".join(f"; {count} {note}" for note, count in Counter(example["notes"]).items())
        where = data.train.row_name(position)
        lines.append(f"\n--- {where}: {trained} of {len(example['input_ids'])} tokens trained ({marks}){noted} ---")
        lines.append(mark_trained(example["input_ids"], example["labels"], tokenizer, colour))
        try:
            difference = _same_as_inference(example, data.train.record(position), tokenizer)
        except RowError as error:
            difference = f"inference could not render this prompt: {error}"
        lines.append(f"inference      {difference or 'the prompt is token for token what inference sends'}")
    return lines
