"""TRL's SFTTrainer, counting what it trains on and applying the bad-row policy to rows met mid-run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from sftkit.fixed_shape import PADDING_KEY
from sftkit.lazy import INVALID_KEY, ROWS_KEY

MIN_ROWS_FOR_FRACTION = 100  # max_invalid_fraction is judged once this many rows have been drawn


class SftkitTrainer(SFTTrainer):
    """SFTTrainer that counts the training tokens fed and trained, and the rows drawn and found invalid."""

    def __init__(self, *args: Any, on_invalid: str = "error", max_invalid_fraction: float = 0.0,
                 known_invalid: set[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.known_invalid = known_invalid or set()  # found before step 1, already counted and listed
        self.tokens_fed = self.tokens_trained = self.rows_drawn = self.rows_invalid = 0
        self.first_invalid: tuple[int, str, str] | None = None
        self.policy_stop: str | None = None
        self.add_callback(RowPolicy(self, on_invalid, max_invalid_fraction))

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        self._count_rows(inputs.pop(INVALID_KEY, []), inputs.pop(ROWS_KEY, None), inputs["labels"])
        labels = inputs["labels"]
        self.tokens_trained += int((labels[..., 1:] != -100).sum())
        mask = inputs.get("attention_mask")
        self.tokens_fed += int(mask.sum()) if mask is not None else labels.numel() - int(inputs.get(PADDING_KEY, 0))
        return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """TRL's loss; padding that gave a packed batch its fixed shape is not counted as tokens seen."""
        padding = inputs.pop(PADDING_KEY, None)
        result = super().compute_loss(model, inputs, *args, **kwargs)
        if padding is not None and self.model.training:
            self._total_train_tokens -= int(self.accelerator.gather_for_metrics(padding.reshape(1)).sum())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result

    def _count_rows(self, invalid: list[tuple[int, str, str]], drawn: int | None, labels: torch.Tensor) -> None:
        self.rows_drawn += drawn if drawn is not None else labels.shape[0]
        invalid = [entry for entry in invalid if entry[0] not in self.known_invalid]
        self.rows_invalid += len(invalid)
        if invalid and self.first_invalid is None:
            self.first_invalid = invalid[0]
        if invalid and self.args.should_save:
            with (Path(self.args.output_dir) / "skipped_rows.jsonl").open("a", encoding="utf-8") as file:
                for row, reason, problem in invalid:
                    file.write(json.dumps({"split": "train", "row": row, "reason": reason, "problem": problem,
                                           "met": "mid-run"}) + "\n")

    def totals(self) -> dict[str, int]:
        """Counts summed over every process."""
        names = ("tokens_fed", "tokens_trained", "rows_drawn", "rows_invalid")
        local = torch.tensor([getattr(self, name) for name in names], dtype=torch.long, device=self.accelerator.device)
        return dict(zip(names, (int(value) for value in self.accelerator.reduce(local, reduction="sum")), strict=True))


class RowPolicy(TrainerCallback):
    """After each step, all processes agree whether an invalid row must stop the run; if so, save and stop."""

    def __init__(self, trainer: SftkitTrainer, on_invalid: str, max_invalid_fraction: float) -> None:
        self.trainer = trainer
        self.on_invalid = on_invalid
        self.max_invalid_fraction = max_invalid_fraction

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        trainer = self.trainer
        local = torch.tensor([trainer.rows_drawn, trainer.rows_invalid], device=trainer.accelerator.device)
        drawn, invalid = (int(value) for value in trainer.accelerator.reduce(local, reduction="sum"))
        if not invalid:
            return control
        if self.on_invalid == "error":
            stop = f"an invalid row was met at step {state.global_step} (on_invalid: error)"
        elif drawn >= MIN_ROWS_FOR_FRACTION and invalid > self.max_invalid_fraction * drawn:
            stop = (f"{invalid} of the {drawn} rows drawn so far are invalid, more than max_invalid_fraction "
                    f"{self.max_invalid_fraction:g}")
        else:
            return control
        if trainer.first_invalid is not None:
            row, reason, problem = trainer.first_invalid
            stop += f"; this process met train row {row}: {reason}: {problem}"
        trainer.policy_stop = stop
        control.should_save = True
        control.should_training_stop = True
        return control
