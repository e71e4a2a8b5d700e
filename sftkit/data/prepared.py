"""What preparation hands the run: the prepared rows of each split, in one layout whatever way prepared them, and
how they fared.

A prepared row holds ``input_ids``, ``labels``, ``length``, ``invalid``, ``problem`` and ``notes``
(``sftkit.data.rows.PREPARED``), and where it came from: ``source_index`` (its source), ``source_split`` and
``source_row`` (its place among that source's rows of the split, ``SplitRows.parts``), and ``row``, its global id,
by which the training order places it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from sftkit.data.account import SourceAccount
from sftkit.data.bad_rows import RowReport, write_skipped
from sftkit.data.plan import Plan, SourceRows


class Preparation(str, Enum):
    """How a run's rows are prepared: the recipe's ``prepare`` (``auto`` picks one of these), or a stream."""

    EAGER = "eager"  # every row before step 1, in batched passes, cached
    LAZY = "lazy"  # a checked sample before step 1; the trainer's rows prepared on demand as it draws them
    PACKED_SHARE = "packed share"  # a bounded packed run: rows drawn at random, prepared in cached chunks
    STREAMED = "streamed"  # rows read from a stream, a window at a time, each prepared when the trainer draws it

    def __str__(self) -> str:
        return self.value


def valid_rows(rows: datasets.Dataset) -> datasets.Dataset:
    """The valid rows: an index mapping, no pass over the data (a cached epoch starts at once)."""
    invalid = rows.with_format("arrow")["invalid"]  # through the index mapping of a selection, if any
    valid = np.flatnonzero(pc.is_null(invalid).to_numpy(zero_copy_only=False))
    return rows if len(valid) == len(rows) else rows.select(valid)


@dataclass(frozen=True)
class SplitRows:
    """A split's prepared rows, and each source's rows they were prepared from (None for a source with none)."""

    rows: datasets.Dataset
    parts: tuple[SourceRows | None, ...]


@dataclass(frozen=True)
class Prepared:
    """What a way of preparing (``sftkit.data.modes``) returns: the rows prepared before step 1, the trainer's rows
    when they are prepared as it draws them (then the train rows are a sample of them), how many sampled
    conversations the render guard rendered, and whether the rows came from the cache."""

    train: SplitRows
    eval: SplitRows | None
    rendered: int
    from_cache: bool
    on_demand: datasets.Dataset | None = None
    order_prefix: bool = False  # the train rows are a prefix of the training order (a bounded packed run), not every row


@dataclass(frozen=True)
class PreparedSplit:
    """The prepared rows of a split (all of them, or a sample of the rows prepared on demand), valid or not, and how
    they fared."""

    name: str
    rows: datasets.Dataset
    parts: tuple[SourceRows | None, ...]  # each source's rows, which ``source_row`` counts in
    report: RowReport
    on_demand: datasets.Dataset | None = None  # the trainer's rows, each prepared when it is drawn
    order_prefix: bool = False  # the rows are a prefix of the training order (a bounded packed run), not every row

    def invalid_row_ids(self) -> set[int]:
        """Global ids of the rows already found invalid, so a lazy run does not report them twice."""
        return {row for row, reason in zip(self.rows["row"], self.rows["invalid"], strict=True) if reason is not None}

    def trainable(self) -> datasets.Dataset:
        """The valid rows' input_ids and labels (eval reads them as they are)."""
        return valid_rows(self.rows).select_columns(["input_ids", "labels"])

    def row_name(self, position: int) -> str:
        """How users see the prepared row at ``position``: its source and its place in what was loaded."""
        entry = self.rows[position]
        return self.parts[entry["source_index"]].row_name(entry["source_row"])

    def record(self, position: int) -> dict[str, Any]:
        """The canonical record of the prepared row at ``position``, made again from its raw row by its chain."""
        entry = self.rows[position]
        return self.parts[entry["source_index"]].record(entry["source_row"])


@dataclass(frozen=True)
class PreparedData:
    """The run's prepared splits, the plan they were prepared by, the way and why, and what the checks found."""

    train: PreparedSplit
    eval: PreparedSplit | None
    plan: Plan
    mode: Preparation
    why: str  # why this way
    rendered: int  # conversations the render guard rendered in this run
    from_cache: bool  # prepared rows came from the cache, whose rows were rendered and checked when prepared
    accounts: list[SourceAccount]  # each source's part of each split

    @property
    def preparation(self) -> str:
        return f"{self.mode} ({self.why})"

    @property
    def splits(self) -> list[PreparedSplit]:
        return [split for split in (self.train, self.eval) if split is not None]

    def describe(self) -> dict[str, Any]:
        """What the run record says about the data."""
        adapters = self.plan.adapters
        return {
            "adapter": adapters[0].describe() if len(adapters) == 1 else [a.describe() for a in adapters],
            "data": {
                "preparation": self.preparation,
                **{f"{split.name}_rows": len(split.on_demand) if split.on_demand else split.report.valid
                   for split in self.splits},
                "invalid_rows": {split.name: dict(split.report.invalid) for split in self.splits},
                "noted": {split.name: dict(split.report.noted) for split in self.splits},
                "eval": self.plan.eval_origin,
                "render_guard_rows": self.rendered,
                "from_cache": self.from_cache,
                "sources": [account.record() for account in self.accounts],
            },
        }

    def write_skipped(self, output_dir: str, resuming: bool) -> int:
        """List every row found invalid before step 1, its reason and its raw content (``bad_rows.write_skipped``)."""
        return write_skipped(self.splits, output_dir, resuming)
