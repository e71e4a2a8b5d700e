"""Streamed: the trainer's rows are read from the stream and prepared as it draws them (``sftkit.data.streaming``);
before step 1, the run's first rows are prepared to check and report, and the held-out rows in full."""

from __future__ import annotations

import datasets
import numpy as np

from sftkit.data import streaming
from sftkit.data.order import order_seed
from sftkit.data.passes import SAMPLE_ROWS, Part, parts, prepared, rows_per_run, run_render_guard
from sftkit.data.plan import Plan, SourceRows
from sftkit.data.prepared import Prepared, SplitRows
from sftkit.recipe import Recipe


def prepare(plan: Plan, recipe: Recipe) -> Prepared:
    """The run's positions read through the stream reader, its first rows as the train sample."""
    held_out = int(recipe.mixture.test_split_size or 0)
    streams = [streaming.Stream(source.source.stream, source.name, source.chain,
                                held_out if source.source.eval is None else 0) for source in plan.sources]
    probabilities = streaming.stream_probabilities(streams, [source.source.fraction for source in plan.sources])
    reader = streaming.StreamReader(streams, streaming.window_counts(probabilities), recipe.sftkit.mixture,
                                    order_seed(recipe.training))
    count, check_rows = rows_per_run(recipe), recipe.sftkit.render_check_rows
    picked = [(position, *reader[position]) for position in range(min(SAMPLE_ROWS, count))]
    sample: list[SourceRows | None] = []
    planned = []
    for index, source in enumerate(plan.sources):  # the run's first rows, as a sample of each source
        mine = [(position, line, raw) for position, source_index, line, raw in picked if source_index == index]
        if not mine:
            sample.append(None)
            continue
        rows = SourceRows(source.name, source.chain, datasets.Dataset.from_list([raw for _, _, raw in mine]),
                          np.array([line for _, line, _ in mine]))
        sample.append(rows)
        positions = np.arange(len(mine))
        planned.append(Part(index, "train", rows, positions, np.array([position for position, _, _ in mine]),
                            rows.rows))
    rendered = run_render_guard(planned, check_rows, "train")
    train = SplitRows(prepared(planned, "train sample", "stream-sample", None), tuple(sample))
    evaluation = None
    if plan.eval is not None:  # numbered after each source's sample (its first rows, where it has none)
        sizes = [len(rows) if rows is not None else len(source.train) for rows, source in zip(sample, plan.sources,
                                                                                                strict=True)]
        offsets = np.cumsum([0, *sizes])
        eval_parts = parts(plan.rows("eval"), plan.eval, offsets)
        rendered += run_render_guard(eval_parts, check_rows, "eval")
        evaluation = SplitRows(prepared(eval_parts, "eval", "stream-eval", None), plan.rows("eval"))
    return Prepared(train, evaluation, rendered, False, streaming.streamed_rows(reader, count))
