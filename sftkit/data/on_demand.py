"""Rows prepared on demand (``prepare: lazy``, and streamed runs): a row is adapted and tokenized when the trainer
draws it, never before.

A bounded run (``max_steps``) reads a fraction of a large dataset; preparing only those rows makes
the time to the first step independent of the dataset's size. The trainer's sampler still draws
from a global shuffle of every row, and each process prepares only the rows of its own shard.
A row that turns out invalid mid-run travels with the batch to ``SftkitTrainer``, which counts it
and applies the bad-row policy.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import datasets

from sftkit.contract import RowError
from sftkit.data.bad_rows import INVALID_KEY, skipped_entry


class DrawnRows(Protocol):
    """The trainer's rows by id: (its source's index, its loaded row, the raw row)."""

    def __getitem__(self, row: int) -> tuple[int, int, dict[str, Any]]: ...


class RowsById:
    """Rows of several sources (each a ``SourceRows``) by global id: each source's ids follow the sources' before it."""

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __getitem__(self, row: int) -> tuple[int, int, dict[str, Any]]:
        index = bisect.bisect_right(self.offsets, row) - 1
        part, position = self.parts[index], row - self.offsets[index]
        return index, part.line(position), part.rows[position]


class PrepareWhenDrawn:
    """A ``set_transform`` function: ids of the trainer's rows in, each row prepared through its source's chain (or
    why it is invalid) out. ``sources``: each source's ``name`` and ``chain``."""

    def __init__(self, rows: DrawnRows, sources: Sequence[Any]) -> None:
        self.rows, self.sources = rows, list(sources)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "row": [], INVALID_KEY: []}
        for row in map(int, batch["row"]):
            index, line, raw = self.rows[row]
            source = self.sources[index]
            (result,) = source.chain([raw])
            invalid = skipped_entry("train", row, result.reason, str(result), source.name, line, raw,
                                    "mid-run") if isinstance(result, RowError) else None
            out["input_ids"].append([] if invalid else result["input_ids"])
            out["labels"].append([] if invalid else result["labels"])
            out["row"].append(row)
            out[INVALID_KEY].append(invalid)
        return out


def prepared_when_drawn(rows: DrawnRows, sources: Sequence[Any], ids: Iterable[int]) -> datasets.Dataset:
    """A dataset of row ids, in the order given, that prepares each row as the trainer reads it (TRL is told not to
    prepare it). ``dataset.data.column("row")`` holds the ids without preparing anything."""
    dataset = datasets.Dataset.from_dict({"row": list(map(int, ids))})
    dataset.set_transform(PrepareWhenDrawn(rows, sources))  # in place: with_transform would copy every id
    return dataset


def on_demand_rows(parts: Sequence[Any], ids: Iterable[int]) -> datasets.Dataset:
    """The rows of ``parts`` (each a ``SourceRows``) by global id, in the order of ``ids``, each prepared when drawn."""
    return prepared_when_drawn(RowsById(parts), parts, ids)
