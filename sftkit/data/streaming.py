"""Streaming (``dataset_streaming: true``, or ``streaming: true`` for a mixture): train from a dataset read as a
stream, from the Hub or from local files, without downloading or converting it first.

The stream is read in windows of ``WINDOW`` rows, its shuffle buffer: each window is shuffled by the run's seed
(the keyed hash of ``sftkit.data.order``), so the row at each position of the run is a function of the seed and
the stream's content alone. A mixture fills each window with every source's share of its rows (the shares of
the trained tokens, ``sftkit.data.mixture``, measured on each source's first rows) and spreads each source evenly
over it, so that any stretch of steps holds the shares; ``mixture: under`` starts every source over when one runs
out, ``mixture: over`` starts over only the one that ran out.

The trainer reads the run's positions (``max_steps`` of them, which streaming requires) and each row is prepared
through the row chain when drawn, as in a lazy run, with the same bad-row policy. Each process prepares only the
rows of its own batches; a resumed run skips the steps its checkpoint made without preparing their rows, and
reads the stream forward to the next position, so it trains exactly the rows the interrupted run would have.
Held-out rows (``test_split_size``, a number of rows) are the first rows of each source, and no training window
holds them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from sftkit.data.mixture import MEASURED_ROWS, trained_tokens_per_row
from sftkit.data.on_demand import prepared_when_drawn
from sftkit.data.order import order_keys
from sftkit.data.rows import RowChain
from sftkit.errors import SftkitError
from sftkit.recipe import Recipe

WINDOW = 4096  # rows shuffled together: a stream's shuffle buffer


def is_streaming(recipe: Recipe) -> bool:
    return bool(recipe.script.dataset_streaming or recipe.mixture.streaming)


@dataclass(frozen=True)
class Stream:
    """One source's stream: its rows after the held-out ones, the name that reports them, and its row chain."""

    rows: datasets.IterableDataset
    name: str
    chain: RowChain
    skip: int  # rows held out at its start

    def read(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(line, row) from the first row after the held-out ones to the end."""
        return enumerate(itertools.islice(iter(self.rows), self.skip, None), start=self.skip)


def window_counts(probabilities: Sequence[float]) -> list[int]:
    """Each source's rows in a window of WINDOW rows: its probability of WINDOW, the largest remainders rounded up."""
    exact = np.asarray(probabilities) * WINDOW
    counts = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - counts), kind="stable")[: WINDOW - counts.sum()]:
        counts[index] += 1
    return counts.tolist()


def stream_probabilities(streams: Sequence[Stream], fractions: Sequence[float | None]) -> list[float]:
    """Each source's share of a window's rows: its share of the trained tokens over its trained tokens a row,
    measured on its first MEASURED_ROWS rows (a stream offers no random sample)."""
    if len(streams) == 1:
        return [1.0]
    if None in fractions:
        raise SftkitError("datasets: a streamed mixture needs fraction on every entry (each source's share of the "
                          "trained tokens)")
    asked = np.asarray(fractions, dtype=float) / sum(fractions)
    measured = []
    for stream in streams:
        head = [row for _, row in itertools.islice(stream.read(), MEASURED_ROWS)]
        tokens = trained_tokens_per_row(stream.chain, head)
        if tokens == 0:
            raise SftkitError(f"{stream.name}: none of its first {len(head)} rows trains a token, so it cannot take "
                              "a share of the trained tokens")
        measured.append(tokens)
    per_row = asked / np.asarray(measured)
    return (per_row / per_row.sum()).tolist()


class StreamReader:
    """The run's training rows in order: position -> (source, line, raw row), read forward window by window."""

    def __init__(self, streams: Sequence[Stream], counts: Sequence[int], how: str, seed: int) -> None:
        self.streams, self.counts, self.how, self.seed = list(streams), list(counts), how, seed
        self._restart()

    def __getstate__(self) -> dict[str, Any]:  # a data-loading worker gets the streams, and reads them itself
        return {"streams": self.streams, "counts": self.counts, "how": self.how, "seed": self.seed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _restart(self) -> None:
        self.readers = [stream.read() for stream in self.streams]
        self.window_index = -1
        self.window: list[tuple[int, int, dict[str, Any]]] = []

    def _next(self, index: int) -> tuple[int, dict[str, Any]]:
        """The next row of source ``index``; at its end the sources start over, as ``mixture`` says."""
        for _ in range(2):
            row = next(self.readers[index], None)
            if row is not None:
                return row
            if self.how == "under":  # a pass of the mixture ends with its scarcest source: all start over
                self.readers = [stream.read() for stream in self.streams]
            else:
                self.readers[index] = self.streams[index].read()
        raise SftkitError(f"{self.streams[index].name}: the stream holds no rows after its held-out ones")

    def _read_window(self) -> None:
        """The next WINDOW rows: each source's rows shuffled, then spread evenly over the window (each at a seeded
        place within its own stretch), so that every stretch of the run, not only a whole window, holds each
        source at its share."""
        self.window_index += 1
        rows, places, first = [], [], self.window_index * WINDOW
        for index, count in enumerate(self.counts):
            ids = np.arange(first, first + count)
            read = [(index, *self._next(index)) for _ in range(count)]
            shuffled = np.argsort(order_keys(ids, self.seed, 0), kind="stable")
            jitter = order_keys(ids, self.seed, 1) / float(2**64)
            rows += [read[i] for i in shuffled]
            places.append((np.arange(count) + jitter) / max(count, 1))
            first += count
        self.window = [rows[i] for i in np.argsort(np.concatenate(places), kind="stable")]

    def __getitem__(self, position: int) -> tuple[int, int, dict[str, Any]]:
        window = position // WINDOW
        if window < self.window_index:  # behind: a new reader (a data-loading worker) or a rewind
            self._restart()
        while self.window_index < window:
            self._read_window()
        return self.window[position % WINDOW]


def streamed_rows(reader: StreamReader, count: int) -> datasets.Dataset:
    """The run's ``count`` positions, each row read and prepared when the trainer draws it."""
    return prepared_when_drawn(reader, reader.streams, range(count))
