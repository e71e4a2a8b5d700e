"""Rows prepared on demand (``prepare: lazy``): a row is adapted and tokenized when the trainer draws it, never before.

A bounded run (``max_steps``) reads a fraction of a large dataset; preparing only those rows makes
the time to the first step independent of the dataset's size. The trainer's sampler still draws
from a global shuffle of every row, and each process prepares only the rows of its own shard.
A row that turns out invalid mid-run travels with the batch to ``SftkitTrainer``, which counts it
and applies the bad-row policy.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from sftkit.contract import RowError
from sftkit.data.bad_rows import INVALID_KEY, skipped_entry
from sftkit.data.rows import RowChain


@dataclass(frozen=True)
class OnDemandSource:
    """One source's raw rows (only the adapter's columns), the row chain that prepares them, and its name."""

    rows: Any  # datasets.Dataset
    chain: RowChain
    name: str
    drawn: Any = None  # the loaded rows a mixture drew (numpy), where it drew them: what skipped_rows.jsonl names

    def loaded_row(self, position: int) -> int:
        return int(self.drawn[position]) if self.drawn is not None else position


class PrepareWhenDrawn:
    """A ``with_transform`` function: global row ids in, prepared rows (or why they are invalid) out."""

    def __init__(self, sources: Sequence[OnDemandSource]) -> None:
        self.sources = list(sources)
        self.offsets = [0]
        for source in self.sources:
            self.offsets.append(self.offsets[-1] + source.rows.num_rows)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "row": [], INVALID_KEY: []}
        for row in map(int, batch["row"]):
            index = bisect.bisect_right(self.offsets, row) - 1
            source = self.sources[index]
            raw = source.rows[row - self.offsets[index]]
            (result,) = source.chain([raw])
            invalid = skipped_entry("train", row, result.reason, str(result), source.name,
                                    source.loaded_row(row - self.offsets[index]), raw, "mid-run") if isinstance(result, RowError) else None
            out["input_ids"].append([] if invalid else result["input_ids"])
            out["labels"].append([] if invalid else result["labels"])
            out["row"].append(row)
            out[INVALID_KEY].append(invalid)
        return out


def on_demand_rows(sources: Sequence[OnDemandSource], ids: Sequence[int]) -> datasets.Dataset:
    """A dataset of row ids, in the order given, that prepares each row as the trainer reads it (TRL is told not to
    prepare it). ``dataset.data.column("row")`` holds the ids without preparing anything."""
    rows = datasets.Dataset.from_dict({"row": list(map(int, ids))})
    rows.set_transform(PrepareWhenDrawn(sources))  # in place: with_transform would copy every id
    return rows
