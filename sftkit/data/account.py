"""An account of every source: what each gave to a split, row by row and token by token.

Rows prepared, valid, invalid by reason, longer than ``max_length`` (truncated, or skipped with ``long_rows:
skip``), tokens fed and trained, and the share of the split's trained tokens each source realised, beside the
share a mixture asked for. ``sftkit check``, the run record and the end-of-run summary show it. A lazy run
prepares only a sample before step 1: its train account is over that sample, and says so.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from sftkit.data.mixture import SHARE_TOLERANCE
from sftkit.data.tokenization import IGNORE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceAccount:
    source: str
    split: str
    rows: int
    valid: int
    invalid: dict[str, int]  # rows by reason
    longer_than_max_length: int  # valid rows truncated to max_length (or, skipped, counted in invalid)
    tokens_fed: int
    tokens_trained: int
    share: float  # of the split's trained tokens
    asked: float | None  # the share a mixture asked for
    sample: bool  # counted over the sample a lazy run prepares before step 1

    def line(self, width: int) -> str:
        invalid = ", ".join(f"{reason} {count}" for reason, count in sorted(self.invalid.items()))
        asked = f", {self.asked:.1%} asked" if self.asked is not None else ""
        return (f"{self.source:<{width}}  {self.share:6.1%} of trained tokens{asked}; {self.rows:,} rows, "
                f"{self.valid:,} valid" + (f", invalid: {invalid}" if invalid else "")
                + f", {self.longer_than_max_length:,} longer than max_length; {self.tokens_fed:,} tokens fed, "
                f"{self.tokens_trained:,} trained")

    def record(self) -> dict[str, Any]:
        return asdict(self)


def metric_names(names: list[str]) -> list[str]:
    """A short name for each source, as metrics are named (``eval_<name>_loss``): its file's stem, made unique."""
    stems = [re.sub(r"[^0-9A-Za-z]+", "_", Path(name.split(":")[-1].rstrip("/")).stem).strip("_") or "source"
             for name in names]
    return [stem if stems.count(stem) == 1 else f"{stem}_{index}" for index, stem in enumerate(stems)]


def _per_row_trained(labels: Any) -> np.ndarray:
    """Trained labels of each row of a list column (arrow), in one pass over the flat values."""
    labels = labels.combine_chunks() if hasattr(labels, "combine_chunks") else labels
    offsets = labels.offsets.to_numpy() - labels.offsets.to_numpy()[0]
    trained = np.concatenate([[0], np.cumsum(labels.flatten().to_numpy(zero_copy_only=False) != IGNORE)])
    return trained[offsets[1:]] - trained[offsets[:-1]]


def account_split(split: Any, names: list[str], asked: list[float] | None, max_length: int | None,
                  sample: bool) -> list[SourceAccount]:
    """Each source's account of a prepared split (``PreparedSplit``)."""
    table = split.rows.with_format("arrow")[:]
    sources = table.column("source_index").to_numpy()
    invalid = table.column("invalid").to_pylist()
    valid = np.array([reason is None for reason in invalid])
    fed = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    trained = _per_row_trained(table.column("labels"))
    lengths = table.column("length").to_numpy()
    longer = valid & (lengths > max_length) if max_length else np.zeros(len(valid), dtype=bool)
    total_trained = max(int(trained[valid].sum()), 1)
    accounts = []
    for index, name in enumerate(names):
        mine = sources == index
        kept = mine & valid
        accounts.append(SourceAccount(
            source=name, split=split.name, rows=int(mine.sum()), valid=int(kept.sum()),
            invalid=dict(Counter(reason for reason, own in zip(invalid, mine, strict=True) if own and reason)),
            longer_than_max_length=int((mine & longer).sum()), tokens_fed=int(fed[kept].sum()),
            tokens_trained=int(trained[kept].sum()), share=float(trained[kept].sum()) / total_trained,
            asked=asked[index] if asked is not None else None, sample=sample))
    return accounts


def check_shares(accounts: list[SourceAccount]) -> None:
    """Warn where a source's realised share of the trained tokens is further than SHARE_TOLERANCE from the asked
    (over every row prepared: a lazy run's sample is too small to judge by)."""
    for account in accounts:
        if account.asked is not None and not account.sample and abs(account.share - account.asked) > SHARE_TOLERANCE:
            logger.warning("mixture: %s realised %.1f%% of the %s split's trained tokens against %.1f%% asked (invalid "
                           "rows, or rows of unusual length in its sample); sftkit check --config shows each source's "
                           "account", account.source, 100 * account.share, account.split, 100 * account.asked)


def account_lines(accounts: list[SourceAccount]) -> list[str]:
    """The account, a header line a split and a line a source."""
    lines, width = [], max(len(account.source) for account in accounts)
    for split in dict.fromkeys(account.split for account in accounts):
        mine = [account for account in accounts if account.split == split]
        over = "the sample prepared before step 1" if mine[0].sample else f"{sum(a.rows for a in mine):,} rows"
        lines.append(f"{split} ({over}):")
        lines += [f"  {account.line(width)}" for account in mine]
    return lines
