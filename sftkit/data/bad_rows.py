"""The bad-row policy: every invalid row is counted by reason, then the run stops or skips it, as the recipe says.

Before step 1 the prepared rows are counted and the policy enforced (``enforce``); rows met mid-run (lazy
preparation) are counted by each process, summed, and policed by ``RowPolicy``. Every invalid row, from
either, is listed in ``output_dir/skipped_rows.jsonl`` by one writer, the main process. An invalid row keeps
its place in the training order and is left out of its batch (``SkippingCollator``), so that the batches are
the same whichever way the rows were prepared.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback

from sftkit.data.tokenization import IGNORE
from sftkit.errors import SftkitError
from sftkit.redaction import redacted

SHOWN_ROWS = 5
SKIPPED_ROWS_FILE = "skipped_rows.jsonl"
INVALID_KEY = "sftkit_invalid"  # the skipped-rows entry of each invalid row prepared on demand in a batch
ROWS_KEY = "sftkit_rows"  # how many rows the batch drew, valid or not
ROW_IDS = "sftkit_row_ids"  # the ids of the rows a batch trains on
MIN_ROWS_FOR_FRACTION = 100  # max_invalid_fraction is judged mid-run once this many rows have been drawn


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


def report_rows(dataset: datasets.Dataset, split: str, sources: Sequence[Any]) -> RowReport:
    """Count the rows that adapting or tokenizing marked ``invalid``, and the notes of the valid ones, each named by
    its source (of ``sources``) and its row there; only the rows that have either are read one by one (a large
    clean split costs no pass)."""
    report = RowReport(split, dataset.num_rows)
    table = dataset.with_format("arrow")[:]
    invalid, notes = table.column("invalid"), table.column("notes")
    with_notes = pc.greater(pc.list_value_length(notes), 0).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(pc.is_valid(invalid).to_numpy(zero_copy_only=False) | with_notes)
    columns = {name: table.column(name).take(rows).to_pylist()
               for name in ("invalid", "problem", "notes", "source_index", "source_split", "source_row")}
    for reason, problem, row_notes, index, source_split, source_row in zip(*columns.values(), strict=True):
        source = sources[index]
        where = (source.name, source.loaded_row(source_split, source_row))
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


def write_skipped(splits: Sequence[Any], sources: Sequence[Any], output_dir: str, resuming: bool) -> int:
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
            source = sources[entry["source_index"]]
            raw = getattr(source, entry["source_split"])[entry["source_row"]]
            entries.append(skipped_entry(split.name, entry["row"], entry["invalid"], entry["problem"], source.name,
                                         source.loaded_row(entry["source_split"], entry["source_row"]), raw,
                                         "before step 1"))
    append_skipped(output_dir, entries + kept)
    return len(entries)


class MidRunRows:
    """One process's count of the rows its trainer drew, and of those found invalid as they were prepared."""

    def __init__(self, known_invalid: set[int]) -> None:
        self.known_invalid = known_invalid  # found before step 1: already counted and listed
        self.drawn = self.invalid = 0
        self.pending: list[dict[str, Any]] = []  # not listed in skipped_rows.jsonl yet
        self.first: tuple[dict[str, Any], int] | None = None  # the first invalid row met, and the step

    def forget(self) -> None:
        """Back to nothing counted (after the batch that proves the speed levers, which is not training)."""
        self.drawn = self.invalid = 0
        self.pending, self.first = [], None

    def count(self, invalid: Sequence[Mapping[str, Any]], drawn: int, step: int) -> None:
        self.drawn += drawn
        new = [dict(entry) for entry in invalid if entry["row"] not in self.known_invalid]
        self.invalid += len(new)
        self.pending += new
        if new and self.first is None:
            self.first = (new[0], step)


class RowPolicy(TrainerCallback):
    """Whether invalid rows met mid-run must stop the run (then: save and stop); lists them as they are met.

    One process decides after every step. Several processes sum their counts, and hand their invalid rows to the
    main process to list, only at logging steps and at the end (a collective every step would make each step wait
    for the slowest process's GPU), so a stop comes at the next logging step after the row.
    """

    def __init__(self, trainer: Any, rows: MidRunRows, on_invalid: str, max_invalid_fraction: float) -> None:
        self.trainer = trainer
        self.rows = rows
        self.on_invalid = on_invalid
        self.max_invalid_fraction = max_invalid_fraction

    def _list_pending(self) -> None:
        accelerator = self.trainer.accelerator
        pending, self.rows.pending = self.rows.pending, []
        if accelerator.num_processes > 1:
            pending = gather_object(pending)
        if accelerator.is_main_process:
            append_skipped(self.trainer.args.output_dir, pending)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        trainer, several = self.trainer, self.trainer.accelerator.num_processes > 1
        if several and not (control.should_log or state.global_step >= state.max_steps):
            return control
        self._list_pending()
        drawn, invalid = summed(trainer.accelerator, self.rows.drawn, self.rows.invalid)
        if not invalid:
            return control
        if self.on_invalid == "error":
            stop = f"an invalid row was met {'by' if several else 'at'} step {state.global_step} (on_invalid: error)"
        elif drawn >= MIN_ROWS_FOR_FRACTION and invalid > self.max_invalid_fraction * drawn:
            stop = (f"{invalid} of the {drawn} rows drawn so far are invalid, more than max_invalid_fraction "
                    f"{self.max_invalid_fraction:g}")
        else:
            return control
        if self.rows.first is not None:
            entry, step = self.rows.first
            stop += (f"; this process met {row_name(entry['source'], entry['source_row'])} at step {step}: "
                     f"{entry['reason']}: {entry['problem']}")
        trainer.policy_stop = stop
        control.should_save = True
        control.should_training_stop = True
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._list_pending()  # rows met after the last logging step
        return control


def summed(accelerator: Any, *counts: int) -> list[int]:
    """Counts summed over every process (a collective when there are several: every process must call it)."""
    if accelerator.num_processes == 1:
        return list(counts)
    local = torch.tensor(counts, dtype=torch.long, device=accelerator.device)
    return [int(value) for value in accelerator.reduce(local, reduction="sum")]


class SkippingCollator:
    """Collates the valid rows of a batch; passes on the invalid ones met on demand, for the policy to count, how many
    rows the batch drew, and the ids of the rows it trains on (a packed sequence's, too)."""

    def __init__(self, collator: Callable[[list], dict[str, Any]], pad_token_id: int) -> None:
        self.collator = collator
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        extra = (INVALID_KEY, "row", "rows")
        valid = [{key: value for key, value in example.items() if key not in extra} for example in examples
                 if example.get(INVALID_KEY) is None and len(example["input_ids"])]  # empty: invalid when prepared
        rows = [row for example in examples if example.get(INVALID_KEY) is None and len(example["input_ids"])
                for row in example.get("rows", [example["row"]] if "row" in example else [])]  # eval rows: none
        # A batch with no valid row still has to step with the others: one padding token that trains nothing.
        batch = self.collator(valid or [{"input_ids": [self.pad_token_id], "labels": [IGNORE]}])
        batch[INVALID_KEY] = [example[INVALID_KEY] for example in examples if example.get(INVALID_KEY) is not None]
        batch[ROWS_KEY] = len(examples)
        batch[ROW_IDS] = rows
        return batch
