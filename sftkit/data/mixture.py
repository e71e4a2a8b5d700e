"""Mixtures: each source's share of the trained tokens, drawn by a seeded random sample of its rows.

``fraction`` on the entries of ``datasets:`` is each source's share of the mixture (normalised to sum to one),
as in TRL, but of the tokens that train rather than of rows: a source of long conversations and one of short
answers at 0.5/0.5 train as many tokens each. Each source's trained tokens per row are measured on a seeded
sample of its rows, prepared through its row chain, and the rows are drawn accordingly:

- ``mixture: under`` (the default) down-samples the larger sources: no row is used twice, and the mixture is as
  large as its scarcest source allows;
- ``mixture: over`` repeats the smaller sources (each row as often as it takes, the remainder a random sample) up
  to their share of a mixture as large as its most plentiful source.

Rows are drawn by a seeded permutation of each source, never its first rows, so a file sorted by topic, length
or date is sampled evenly. Held-out rows (``test_split_size``) are held out of each source before anything is
drawn, in proportion to its size, so a repeated row never lands on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np

from sftkit.data.rows import RowChain
from sftkit.data.tokenization import IGNORE
from sftkit.errors import SftkitError

MEASURED_ROWS = 1024  # rows of each source measured for its trained tokens per row
SHARE_TOLERANCE = 0.02  # a realised share this far from the asked one is worth a warning


@dataclass(frozen=True)
class Draw:
    """What a mixture took from one source."""

    asked: float  # its share of the trained tokens, normalised
    available: int  # its rows, held-out ones left out
    drawn: int  # rows drawn for training (repeats counted)
    tokens_per_row: float  # trained tokens a row, on the measured sample
    held_out: int  # its rows held out for evaluation
    train_rows: np.ndarray = field(repr=False, compare=False)  # the loaded rows drawn for training, sorted
    eval_rows: np.ndarray | None = field(repr=False, compare=False)  # the loaded rows held out, sorted

    def describe(self, name: str) -> str:
        repeats = f", each row {self.drawn / self.available:.2f} times on average" if self.drawn > self.available else ""
        return (f"{name}: {self.asked:.0%} of the trained tokens asked; {self.drawn:,} of its {self.available:,} rows "
                f"drawn{repeats} ({self.tokens_per_row:.0f} trained tokens a row on a sample), {self.held_out:,} held "
                "out")


def trained_tokens_per_row(chain: RowChain, rows: Sequence[Mapping[str, Any]]) -> float:
    """Trained tokens a row over raw ``rows`` of a source, a row that cannot train counting as none."""
    results = chain(rows)
    trained = [0 if isinstance(result, Exception) else sum(label != IGNORE for label in result["labels"])
               for result in results]
    return float(np.mean(trained)) if trained else 0.0


def _drawn_rows(permutation: np.ndarray, count: int) -> np.ndarray:
    """``count`` rows of a source from its seeded permutation: whole passes over it, then a prefix of it."""
    passes, rest = divmod(count, len(permutation))
    return np.sort(np.concatenate([np.tile(permutation, passes), permutation[:rest]]))


def _held_out_counts(sizes: Sequence[int], test_split_size: float | None) -> list[int]:
    """Each source's held-out rows: a fraction of each, or a row count shared in proportion to their sizes."""
    if not test_split_size:
        return [0] * len(sizes)
    if test_split_size < 1:
        return [max(1, round(test_split_size * size)) for size in sizes]
    total = sum(sizes)
    return [max(1, round(test_split_size * size / total)) for size in sizes]


def draw_mixture(names: Sequence[str], rows: Sequence[datasets.Dataset], chains: Sequence[RowChain],
                 fractions: Sequence[float | None], how: str, test_split_size: float | None, seed: int) -> list[Draw]:
    """Hold out each source's eval rows, then draw its training rows at its share of the trained tokens: each
    source's rows selected (by their place in ``rows``, each source's loaded rows), and what was drawn."""
    if None in fractions:
        raise SftkitError("datasets: set fraction on every entry of the mixture, or on none")
    if any(fraction <= 0 for fraction in fractions):
        raise SftkitError("datasets: every fraction must be above 0 (leave an entry out to leave its source out)")
    asked = np.array(fractions, dtype=float) / sum(fractions)
    held_out = _held_out_counts([loaded.num_rows for loaded in rows], test_split_size)
    permutations, held, measured = [], [], []
    for index, (name, loaded, chain, count) in enumerate(zip(names, rows, chains, held_out, strict=True)):
        permutation = np.random.default_rng([seed, index]).permutation(loaded.num_rows)
        if count >= len(permutation):
            raise SftkitError(f"datasets[{index}] ({name}): test_split_size {test_split_size} leaves no training "
                              f"rows out of its {len(permutation)}")
        held.append(np.sort(permutation[:count]) if count else None)
        permutations.append(permutation[count:])
        measured.append(trained_tokens_per_row(chain, [loaded[int(row)] for row in permutations[-1][:MEASURED_ROWS]]))
    for index, (name, tokens) in enumerate(zip(names, measured, strict=True)):
        if tokens == 0:
            raise SftkitError(f"datasets[{index}] ({name}): none of {min(MEASURED_ROWS, len(permutations[index]))} "
                              "rows sampled trains a token, so it cannot take a share of the trained tokens; check it "
                              "with sftkit check --config on a recipe with this dataset alone")
    # Rows drawn from each source in proportion to its share over its tokens a row; the mixture's size in rows is
    # set by the scarcest source (under) or the most plentiful one (over).
    per_row = asked / np.array(measured)
    per_row /= per_row.sum()
    sizes = np.array([len(permutation) for permutation in permutations])
    total = (sizes / per_row).min() if how == "under" else (sizes / per_row).max()
    draws = []
    for permutation, share, row_share, tokens, count, eval_rows in zip(permutations, asked, per_row, measured,
                                                                        held_out, held, strict=True):
        drawn = max(1, round(row_share * total))
        if how == "under":
            drawn = min(drawn, len(permutation))
        draws.append(Draw(float(share), len(permutation), drawn, tokens, count, _drawn_rows(permutation, drawn),
                          eval_rows))
    return draws
