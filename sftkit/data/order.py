"""The order a run trains in: a function of the seed, the epoch and each row's id, and of nothing else.

A row's place comes from a keyed hash of its global id, so a row keeps its place relative to every
other row whichever rows a run prepares (a lazy run or an eager one, a packed share sized by
``max_steps``, rows an invalid-row policy leaves out). A resumed run that skips the steps its
checkpoint made therefore trains next exactly what the interrupted run would have.

Packed runs pack the rows in this order, window by window (``PACKING_WINDOW`` rows at a time): a pack
holds rows of one window only, so a larger share of the data adds packs after the ones a shorter run
made and changes none of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from trl import pack_dataset

PACKING_WINDOW = 1024  # rows packed together; larger windows pack a little tighter, smaller ones share more
WINDOWS_AT_ONCE = 64  # windows handed to TRL's packing in one pass (memory: their tokens, three times)
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def order_keys(ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """A pseudo-random 64-bit key for each id (splitmix64 of the id, seed and epoch): sort by it to shuffle."""
    with np.errstate(over="ignore"):
        x = np.asarray(ids, dtype=np.uint64) + np.uint64(seed) * _MIX[0] + np.uint64(epoch + 1) * _MIX[1]
        x = (x ^ (x >> np.uint64(30))) * _MIX[1]
        x = (x ^ (x >> np.uint64(27))) * _MIX[2]
        return x ^ (x >> np.uint64(31))


def training_order(ids: np.ndarray, seed: int, epoch: int = 0) -> np.ndarray:
    """``ids`` in the order ``epoch`` trains them."""
    ids = np.asarray(ids)
    return ids[np.argsort(order_keys(ids, seed, epoch), kind="stable")]


class EpochOrder(torch.utils.data.Sampler):
    """The trainer's sampler over a dataset already laid out in the first epoch's order: the first epoch reads it
    as it is, every later one in the order of ``order_keys`` of its items' keys (row ids, or pack numbers)."""

    def __init__(self, keys: np.ndarray, seed: int) -> None:
        self.keys = np.asarray(keys)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[int]:
        if self.epoch == 0:
            return iter(range(len(self.keys)))
        return iter(np.argsort(order_keys(self.keys, self.seed, self.epoch), kind="stable").tolist())


def pack_in_order(rows: datasets.Dataset, max_length: int, strategy: str,
                  whole_windows_only: bool = False) -> datasets.Dataset:
    """Pack valid rows (``input_ids``, ``labels``, ``row``; in training order) window by window.

    Each pack lists the ids of the rows it holds (``rows``). ``whole_windows_only``: leave out a last window that
    is not full, whose packs would change as more rows come (a packed share that is not the whole dataset).
    """
    count = len(rows) - len(rows) % PACKING_WINDOW if whole_windows_only else len(rows)
    step = PACKING_WINDOW * WINDOWS_AT_ONCE
    packed = [_pack_windows(rows.select(range(start, min(start + step, count))), max_length, strategy)
              for start in range(0, count, step)]
    if not packed:
        return datasets.Dataset.from_dict({"input_ids": [], "labels": [], "rows": []})
    return datasets.concatenate_datasets(packed)


def _pack_windows(rows: datasets.Dataset, max_length: int, strategy: str) -> datasets.Dataset:
    """TRL's packing, one window to a batch, with a marker column that says which rows each pack holds: a row's id
    on its first token, -1 on the others."""
    table = rows.with_format("arrow")[:]
    tokens = table.column("input_ids").combine_chunks()
    bounds = tokens.offsets.to_numpy() - tokens.offsets.to_numpy()[0]
    lengths = np.diff(bounds)
    marker = np.full(int(bounds[-1]), -1, dtype=np.int64)
    marker[bounds[:-1][lengths > 0]] = table.column("row").to_numpy()[lengths > 0]
    marked = datasets.Dataset(pa.table({
        "input_ids": tokens, "labels": table.column("labels").combine_chunks(),
        "row_marker": pa.ListArray.from_arrays(pa.array(bounds.astype(np.int32)), pa.array(marker)),
    }))
    packs = pack_dataset(marked, max_length, strategy, map_kwargs={"batch_size": PACKING_WINDOW})
    markers = packs.data.column("row_marker").combine_chunks()
    values, ends = markers.flatten().to_numpy(), markers.offsets.to_numpy() - markers.offsets.to_numpy()[0]
    first = values >= 0
    counts = np.bincount(np.repeat(np.arange(len(markers)), np.diff(ends))[first], minlength=len(markers))
    held = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)),
                                    pa.array(values[first]))
    return packs.remove_columns("row_marker").add_column("rows", held.to_pylist())


def in_training_order(rows: datasets.Dataset, seed: int) -> datasets.Dataset:
    """Prepared rows (each with its ``row`` id) laid out in the first epoch's order: an index mapping, no copy."""
    ids = rows.with_format("arrow")["row"].to_numpy()
    return rows.select(np.argsort(order_keys(ids, seed, 0), kind="stable"))


def order_seed(args: Any) -> int:
    """The seed of the training order: ``data_seed`` where the recipe sets it, else ``seed``."""
    return args.data_seed if args.data_seed is not None else args.seed
