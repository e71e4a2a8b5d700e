"""Invalid rows met mid-run (lazy or streamed preparation): left out of their batch, counted by each process,
summed, and policed as the recipe's bad-row policy says, while they are listed in ``skipped_rows.jsonl``.

An invalid row keeps its place in the training order and is left out of its batch (``SkippingCollator``), so that
the batches are the same whichever way the rows were prepared. The policy itself and the report of rows found
before step 1 are the data package's (``sftkit.data.bad_rows``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback

from sftkit.data.bad_rows import INVALID_KEY, append_skipped, row_name
from sftkit.data.tokenization import IGNORE
from sftkit.train.batches import facts
from sftkit.train.shutdown import Stop

MIN_ROWS_FOR_FRACTION = 100  # max_invalid_fraction is judged mid-run once this many rows have been drawn

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
        trainer.stopped = Stop("invalid rows", stop)
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
        noted = facts(batch)
        noted.invalid = [example[INVALID_KEY] for example in examples if example.get(INVALID_KEY) is not None]
        noted.rows_drawn = len(examples)
        noted.row_ids = rows
        return batch
