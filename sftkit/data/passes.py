"""Passes of planned rows through the row chain, shared by every way of preparing them: the render guard on a sample
first, then each source's rows prepared in batched passes and tagged with where they came from (the layout of
``sftkit.data.prepared``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import numpy as np

from sftkit.contract import RowError
from sftkit.data.plan import Plan, SourceRows, SplitPlan
from sftkit.data.render_guard import check_rendering, sample_indices
from sftkit.data.rows import prepare_rows
from sftkit.hardware import usable_cpus
from sftkit.recipe import Recipe

PARALLEL_FROM_ROWS = 20_000  # below this, a process pool costs more than it saves
SAMPLE_ROWS = 256  # rows a run that prepares on demand prepares before step 1, to check and report


@dataclass(frozen=True)
class Part:
    """One source's planned rows of a split: which of its rows (``positions``), with their global ``ids``."""

    index: int  # the source's
    source_split: str
    of: SourceRows
    positions: np.ndarray
    ids: np.ndarray
    raw: datasets.Dataset  # the rows at ``positions``


def parts(rows: Sequence[SourceRows | None], split: SplitPlan, offsets: np.ndarray) -> list[Part]:
    """Each source's rows (of ``rows``) that ``split`` takes: where its ids fall in that source's stretch of
    ``offsets``, or all of them."""
    out = []
    for index, of in enumerate(rows):
        if of is None:
            continue
        positions, raw = np.arange(len(of)), of.rows
        if split.ids is not None:
            positions = split.ids[(split.ids >= offsets[index]) & (split.ids < offsets[index + 1])] - offsets[index]
            raw = raw.select(positions)
        out.append(Part(index, split.source_split, of, positions, positions + offsets[index], raw))
    return out


def planned_parts(plan: Plan, split: SplitPlan) -> list[Part]:
    return parts(plan.rows(split.source_split), split, plan.offsets())


def run_render_guard(planned: Sequence[Part], count: int, split: str) -> int:
    """The render guard on ``count`` rows spread over the split, before any row is prepared; returns rows rendered."""
    total = sum(len(part.positions) for part in planned)
    picked, records, start = set(sample_indices(total, count)), [], 0
    for part in planned:
        for position in sorted(p - start for p in picked if start <= p < start + len(part.positions)):
            row = int(part.positions[position])
            try:
                records.append((part.of.row_name(row), part.of.record(row)))
            except RowError:
                continue  # counted by the bad-row policy when the row is prepared
        start += len(part.positions)
    if not records:
        return 0
    chain = planned[0].of.chain
    return check_rendering(records, chain.tokenizer, chain.settings, split)


def prepared(planned: Sequence[Part], name: str, key: str, num_proc: int | None) -> datasets.Dataset:
    """Every planned row through its source's chain, tagged with where it came from."""
    out = []
    for part in planned:
        rows = prepare_rows(part.raw, part.of.chain, name, f"{key}-{name}-{part.index}", num_proc)
        rows = rows.add_column("source_index", [part.index] * rows.num_rows)
        rows = rows.add_column("source_split", [part.source_split] * rows.num_rows)
        rows = rows.add_column("source_row", part.positions.tolist())
        out.append(rows.add_column("row", part.ids.tolist()))  # the id the training order places it by
    return datasets.concatenate_datasets(out)


def processes(recipe: Recipe, plan: Plan) -> int | None:
    """Processes that prepare rows: the recipe's dataset_num_proc, else every usable CPU for a large dataset."""
    return recipe.training.dataset_num_proc or (usable_cpus() if plan.offsets()[-1] >= PARALLEL_FROM_ROWS else None)


def rows_per_run(recipe: Recipe) -> int:
    """Rows (packed sequences, when packing) the trainer draws over max_steps, all processes together."""
    return recipe.training.max_steps * recipe.batch.rows_per_step
