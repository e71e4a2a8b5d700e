"""TRL's SFTTrainer, counting what it trains on, computing the loss without logits, and applying the bad-row
policy to rows met mid-run.

Nothing here waits for the GPU between steps: token counts arrive with each batch as integers
(``sftkit.counting``), and the counters of several processes are summed only when they are logged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from sftkit.counting import TOKENS_FED, TOKENS_TRAINED
from sftkit.head_loss import LABEL_POSITIONS, add_head_loss
from sftkit.lazy import INVALID_KEY, ROWS_KEY

MIN_ROWS_FOR_FRACTION = 100  # max_invalid_fraction is judged once this many rows have been drawn


class SftkitTrainer(SFTTrainer):
    """SFTTrainer that counts the training tokens fed and trained, and the rows drawn and found invalid.

    ``head_loss``: a kernel of ``sftkit.head_loss`` that computes the training loss from the hidden states,
    or None for TRL's own fused head (which also logs entropy and token accuracy).
    """

    def __init__(self, *args: Any, on_invalid: str = "error", max_invalid_fraction: float = 0.0,
                 known_invalid: set[int] | None = None, head_loss: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_loss = head_loss
        if head_loss is not None:
            add_head_loss(self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model,
                          head_loss)
        self.known_invalid = known_invalid or set()  # found before step 1, already counted and listed
        self.tokens_fed = self.tokens_trained = self.rows_drawn = self.rows_invalid = 0
        self.first_invalid: tuple[int, str, str, int] | None = None
        self.policy_stop: str | None = None
        self.add_callback(RowPolicy(self, on_invalid, max_invalid_fraction))

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        fed, trained = inputs.pop(TOKENS_FED, 0), inputs.pop(TOKENS_TRAINED, 0)
        positions = inputs.pop(LABEL_POSITIONS, None)
        invalid, drawn = inputs.pop(INVALID_KEY, []), inputs.pop(ROWS_KEY, None)
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.tokens_fed += fed
        self.tokens_trained += trained
        self._count_rows(invalid, drawn if drawn is not None else inputs["labels"].shape[0])
        if self.head_loss is None or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        summed = model(**inputs, sftkit_head_loss=True, **{LABEL_POSITIONS: positions})
        # As TRL divides: by the tokens of the whole optimizer step (all processes, when averaged across them).
        tokens = num_items_in_batch if num_items_in_batch is not None else trained
        loss = summed / torch.as_tensor(tokens, device=summed.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Tokens seen, counted by the collators, summed over the processes only here, when logged."""
        self._total_train_tokens = self._summed(self.tokens_fed)[0]
        self._metrics["train" if self.model.training else "eval"]["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)

    def _summed(self, *counts: int) -> list[int]:
        if self.accelerator.num_processes == 1:
            return list(counts)
        local = torch.tensor(counts, dtype=torch.long, device=self.accelerator.device)
        return [int(value) for value in self.accelerator.reduce(local, reduction="sum")]

    def _count_rows(self, invalid: list[tuple[int, str, str]], drawn: int) -> None:
        self.rows_drawn += drawn
        invalid = [entry for entry in invalid if entry[0] not in self.known_invalid]
        self.rows_invalid += len(invalid)
        if invalid and self.first_invalid is None:
            self.first_invalid = (*invalid[0], self.state.global_step + 1)
        if invalid and self.args.should_save:
            with (Path(self.args.output_dir) / "skipped_rows.jsonl").open("a", encoding="utf-8") as file:
                for row, reason, problem in invalid:
                    file.write(json.dumps({"split": "train", "row": row, "reason": reason, "problem": problem,
                                           "met": "mid-run"}) + "\n")

    def totals(self) -> dict[str, int]:
        """Counts summed over every process (every process must call it)."""
        names = ("tokens_fed", "tokens_trained", "rows_drawn", "rows_invalid")
        return dict(zip(names, self._summed(*(getattr(self, name) for name in names)), strict=True))


class RowPolicy(TrainerCallback):
    """Whether an invalid row must stop the run; if so, save and stop.

    One process decides after every step. Several processes sum their counters only at logging steps
    and at the last step (a collective every step would make each step wait for the slowest process's
    GPU), so a stop comes at the next logging step after the row.
    """

    def __init__(self, trainer: SftkitTrainer, on_invalid: str, max_invalid_fraction: float) -> None:
        self.trainer = trainer
        self.on_invalid = on_invalid
        self.max_invalid_fraction = max_invalid_fraction

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        trainer = self.trainer
        if trainer.accelerator.num_processes > 1 and not (control.should_log or state.global_step >= state.max_steps):
            return control
        drawn, invalid = trainer._summed(trainer.rows_drawn, trainer.rows_invalid)
        if not invalid:
            return control
        if self.on_invalid == "error":
            when = "at" if trainer.accelerator.num_processes == 1 else "by"
            stop = f"an invalid row was met {when} step {state.global_step} (on_invalid: error)"
        elif drawn >= MIN_ROWS_FOR_FRACTION and invalid > self.max_invalid_fraction * drawn:
            stop = (f"{invalid} of the {drawn} rows drawn so far are invalid, more than max_invalid_fraction "
                    f"{self.max_invalid_fraction:g}")
        else:
            return control
        if trainer.first_invalid is not None:
            row, reason, problem, step = trainer.first_invalid
            stop += f"; this process met train row {row} at step {step}: {reason}: {problem}"
        trainer.policy_stop = stop
        control.should_save = True
        control.should_training_stop = True
        return control
