"""The bad-row policy: every invalid row is counted by reason, then the run stops or skips it, as the recipe says.

Before step 1 the prepared rows are counted (``report_rows``) and the policy enforced (``enforce``). Every
invalid row is listed in ``output_dir/skipped_rows.jsonl`` by one writer, the main process; rows met mid-run
(lazy or streamed preparation) are the training side's to count and police (``sftkit.train.row_policy``), under
this same policy and into this same file.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from sftkit.errors import SftkitError
from sftkit.redaction import redacted

SHOWN_ROWS = 5
SKIPPED_ROWS_FILE = "skipped_rows.jsonl"
INVALID_KEY = "sftkit_invalid"  # the skipped-rows entry of each invalid row prepared on demand in a batch


def _short(source: str) -> str:
    """A local file by its name, anything else (a Hub id, an embedded sample) as it is."""
    return Path(source).name if Path(source).exists() else source


def row_name(source: str, row: int) -> str:
    """How a row is named to users everywhere (check, the log, errors, skipped_rows.jsonl): its source and its
    position there, counted from 0 (a JSON Lines file's row 5 is its sixth line)."""
    return f"{_short(source)} row {row}"


def _named(rows: list[tuple[str, int]]) -> str:
    """``a.jsonl rows 3, 5, b.jsonl row 2``: rows named by source, each source once."""
    by_source: dict[str, list[int]] = defaultdict(list)
    for source, row in rows:
        by_source[source].append(row)
    return ", ".join(f"{_short(source)} row{'s' if len(found) > 1 else ''} "
                     f"{', '.join(map(str, found))}" for source, found in by_source.items())


@dataclass
class RowReport:
    """How the rows of one split fared: invalid rows counted by reason, what was noted of the valid ones (turns left
    untrained, reasoning not rendered, cuts to max_length) counted by note, and the first few rows of each, named by
    their source and their position there (``row_name``)."""

    split: str
    rows: int
    invalid: Counter = field(default_factory=Counter)
    examples: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: defaultdict(list))
    problems: dict[tuple[str, int], tuple[str, str]] = field(default_factory=dict)  # row -> (reason, message)
    noted: Counter = field(default_factory=Counter)

    @property
    def valid(self) -> int:
        return self.rows - sum(self.invalid.values())

    def lines(self) -> list[str]:
        out = [f"{self.split}: {self.rows:,} rows, {self.valid:,} valid"]
        for label, counts in (("", self.invalid), ("noted: ", self.noted)):
            for reason, count in counts.most_common():
                rows = self.examples[reason]
                out.append(f"  {label}{count:,} {reason} ({_named(rows)}{', ...' if count > len(rows) else ''})")
        return out

    def first_problem(self) -> str:
        (source, row), (_, message) = next(iter(self.problems.items()))
        return f"{row_name(source, row)}: {message}"


def report_rows(dataset: datasets.Dataset, split: str, parts: Sequence[Any]) -> RowReport:
    """Count the rows that adapting or tokenizing marked ``invalid``, and the notes of the valid ones, each named by
    its source's rows (of ``parts``: ``name``, and ``line`` of a ``source_row``); only the rows that have either are
    read one by one (a large clean split costs no pass)."""
    report = RowReport(split, dataset.num_rows)
    table = dataset.with_format("arrow")[:]
    invalid, notes = table.column("invalid"), table.column("notes")
    with_notes = pc.greater(pc.list_value_length(notes), 0).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(pc.is_valid(invalid).to_numpy(zero_copy_only=False) | with_notes)
    columns = {name: table.column(name).take(rows).to_pylist()
               for name in ("invalid", "problem", "notes", "source_index", "source_row")}
    for reason, problem, row_notes, index, source_row in zip(*columns.values(), strict=True):
        part = parts[index]
        where = (part.name, part.line(source_row))
        if reason is not None:
            report.invalid[reason] += 1
            if len(report.examples[reason]) < SHOWN_ROWS:
                report.examples[reason].append(where)
                report.problems[where] = (reason, problem)
        for note in row_notes:
            report.noted[note] += 1
            if where not in report.examples[note] and len(report.examples[note]) < SHOWN_ROWS:
                report.examples[note].append(where)
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


def skipped_entry(split: str, row: int, reason: str, problem: str, source: str, source_row: int, data: Any,
                  met: str) -> dict[str, Any]:
    """One line of skipped_rows.jsonl: which row (global id, and its source's own), why, and its raw content."""
    return {"split": split, "row": row, "reason": reason, "problem": problem, "source": source,
            "source_row": source_row, "data": data, "met": met}


def _listed(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def append_skipped(output_dir: str, entries: Sequence[Mapping[str, Any]]) -> None:
    """The one writer of skipped_rows.jsonl (called by the main process only); a row already listed is not listed
    again (a resumed run meets again the rows between its checkpoint and the interruption)."""
    path = Path(output_dir) / SKIPPED_ROWS_FILE
    listed = {(entry["split"], entry["row"]) for entry in _listed(path)}
    entries = [entry for entry in entries if (entry["split"], entry["row"]) not in listed]
    if not entries:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        for entry in entries:
            file.write(json.dumps(redacted(entry), ensure_ascii=False, default=str) + "\n")  # redacted, then encoded


def write_skipped(splits: Sequence[Any], output_dir: str, resuming: bool) -> int:
    """skipped_rows.jsonl with every row of ``splits`` (PreparedSplit) found invalid before step 1: a new list, or,
    when the run resumes, with the rows its interrupted part met mid-run kept (it will not meet them again)."""
    path = Path(output_dir) / SKIPPED_ROWS_FILE
    kept = [entry for entry in _listed(path) if entry.get("met") == "mid-run"] if resuming else []
    path.unlink(missing_ok=True)
    entries = []
    for split in splits:
        rows = split.rows
        for position in [p for p, reason in enumerate(rows["invalid"]) if reason is not None]:
            entry = rows[position]
            part = split.parts[entry["source_index"]]
            entries.append(skipped_entry(split.name, entry["row"], entry["invalid"], entry["problem"], part.name,
                                         part.line(entry["source_row"]), part.rows[entry["source_row"]],
                                         "before step 1"))
    append_skipped(output_dir, entries + kept)
    return len(entries)
