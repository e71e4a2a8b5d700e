"""The bad-row policy: every invalid row is counted by reason, then the run stops or skips them, as the recipe says."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from sftkit.errors import SftkitError

SHOWN_ROWS = 5
SKIPPED_ROWS_FILE = "skipped_rows.jsonl"


@dataclass
class RowReport:
    """How the rows of one split fared: counts by reason and the first few row indices of each."""

    split: str
    rows: int
    invalid: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    problems: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (reason, message)

    @property
    def valid(self) -> int:
        return self.rows - sum(self.invalid.values())

    def lines(self) -> list[str]:
        out = [f"{self.split}: {self.rows:,} rows, {self.valid:,} valid"]
        for reason, count in self.invalid.most_common():
            shown = ", ".join(str(row) for row in self.examples[reason])
            out.append(f"  {count:,} {reason} (rows {shown}{', ...' if count > len(self.examples[reason]) else ''})")
        return out

    def first_problem(self) -> str:
        row = min(self.problems)
        _, message = self.problems[row]
        return f"{self.split} row {row}: {message}"


def report_rows(dataset: datasets.Dataset, split: str) -> RowReport:
    """Count the rows that adapting or tokenizing marked ``invalid``."""
    report = RowReport(split, dataset.num_rows)
    if dataset.data.column("invalid").null_count == dataset.num_rows:
        return report  # every row valid: nothing to count (and no pass over a large split)
    for row, (reason, message) in enumerate(zip(dataset["invalid"], dataset["problem"], strict=True)):
        if reason is None:
            continue
        report.invalid[reason] += 1
        if len(report.examples[reason]) < SHOWN_ROWS:
            report.examples[reason].append(row)
            report.problems[row] = (reason, message)
    return report


def enforce(report: RowReport, on_invalid: str, max_invalid_fraction: float) -> None:
    """Stop before step 1 when the policy says so, with the counts and what to do."""
    bad = report.rows - report.valid
    if report.rows and report.valid == 0:
        raise SftkitError(
            f"every one of the {report.rows:,} {report.split} rows is invalid, so there is nothing to train on:\n"
            + "\n".join(report.lines()) + f"\nFirst: {report.first_problem()}\n"
            "Check dataset_format and dataset_options (sftkit check shows what the adapter makes of the data)."
        )
    if not bad:
        return
    if on_invalid == "error":
        raise SftkitError(
            f"{bad:,} of {report.rows:,} {report.split} rows are invalid:\n" + "\n".join(report.lines())
            + f"\nFirst: {report.first_problem()}\n"
            "Fix the data, or set on_invalid: skip to leave such rows out (they are listed in "
            f"output_dir/{SKIPPED_ROWS_FILE})."
        )
    if bad / report.rows > max_invalid_fraction:
        raise SftkitError(
            f"{bad:,} of {report.rows:,} {report.split} rows are invalid ({bad / report.rows:.1%}), more than "
            f"max_invalid_fraction {max_invalid_fraction:g}:\n" + "\n".join(report.lines())
            + f"\nFirst: {report.first_problem()}\nFix the data, or raise max_invalid_fraction if that many is expected."
        )


def write_skipped(rows: datasets.Dataset, sources: Sequence[Any], split: str, path: Path) -> int:
    """Append each invalid row, its reason and its raw content to ``skipped_rows.jsonl``; returns how many."""
    invalid = [row for row, reason in enumerate(rows["invalid"]) if reason is not None]
    if not invalid:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        for row in invalid:
            entry = rows[row]
            source = sources[entry["source"]]
            raw = getattr(source, entry["source_split"])[entry["source_row"]]
            line = {"split": split, "row": row, "reason": entry["invalid"], "problem": entry["problem"],
                    "source": source.name, "source_row": entry["source_row"], "data": raw}
            file.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
    return len(invalid)
