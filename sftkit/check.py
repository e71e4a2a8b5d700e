"""``sftkit check``: everything training would do before its first step, printed, without loading weights."""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedTokenizerBase

from sftkit.bad_rows import enforce
from sftkit.data import PreparedSplit, prepare_data
from sftkit.model import load_tokenizer
from sftkit.recipe import Recipe
from sftkit.tokenization import IGNORE

TRAINED_COLOUR, RESET = "\x1b[1;32m", "\x1b[0m"
PLAIN_MARKS = ("[[", "]]")


def mark_trained(input_ids: list[int], labels: list[int], tokenizer: PreTrainedTokenizerBase, colour: bool) -> str:
    """The tokens as text, with the ones that carry loss in green (or between [[ and ]])."""
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


def check(recipe: Recipe, shown_rows: int, colour: bool) -> None:
    """Describe what would train, then raise SftkitError if the bad-row policy would stop the run."""
    tokenizer = load_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer, enforce_policy=False)
    splits = [split for split in (data.train, data.eval) if split is not None]
    lines = [f"recipe         {recipe.source}"]
    lines += [f"note           {note}" for note in recipe.notes]
    for choice in data.adapters:
        installed = choice.installed
        lines.append(f"adapter        {installed.adapter.name} from {installed.distribution} {installed.version} "
                     f"for {choice.source}: {choice.reason}")
    sample = "; the train counts below cover a sample spread over all rows" if data.train.lazy is not None else ""
    lines.append(f"preparation    {data.mode}{sample}")
    rows = [line for split in splits for line in split.report.lines()]
    lines += [f"{'rows' if index == 0 else '':<15}{line}" for index, line in enumerate(rows)]
    lines.append(f"eval           {data.eval_origin}")
    lengths = [_lengths(split, recipe.training.max_length) for split in splits]
    lines += [f"{'lengths' if index == 0 else '':<15}{line}" for index, line in enumerate(lengths)]
    if recipe.training.max_length is not None:
        cut = "skipped as too long" if recipe.sftkit.long_rows == "skip" else "truncated"
        lines.append(f"{'':<15}rows longer than max_length are {cut} (long_rows)")
    rendered = {0: "nothing to render (the data is not conversational)",
                -1: "checked when these rows were prepared (loaded from the cache)"}.get(
        data.rows_checked, f"{data.rows_checked} sampled conversations render every turn")
    lines.append(f"render guard   {rendered}")
    marks = "green" if colour else "between [[ and ]]"
    valid = [row for row, reason in enumerate(data.train.rows["invalid"]) if reason is None]
    for row in valid[:shown_rows]:
        example = data.train.rows[row]
        trained = sum(label != IGNORE for label in example["labels"][1:])
        lines.append(f"\n--- train row {row}: {trained} of {len(example['input_ids'])} tokens trained ({marks}) ---")
        lines.append(mark_trained(example["input_ids"], example["labels"], tokenizer, colour))
    print("\n".join(lines), flush=True)
    for split in splits:
        enforce(split.report, recipe.sftkit.on_invalid, recipe.sftkit.max_invalid_fraction)
    print("\ntraining would start: ok")
