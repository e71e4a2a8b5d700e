"""TRL's SFTTrainer, counting what it trains on so the end-of-run summary can say it."""

from __future__ import annotations

from typing import Any

import torch
from trl import SFTTrainer


class SftkitTrainer(SFTTrainer):
    """SFTTrainer that counts, per process, the training tokens fed and the ones that carry loss."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens_fed = 0
        self.tokens_trained = 0

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        labels = inputs["labels"]
        self.tokens_trained += int((labels[..., 1:] != -100).sum())
        mask = inputs.get("attention_mask")
        self.tokens_fed += int(mask.sum()) if mask is not None else labels.numel()
        return super().training_step(model, inputs, *args, **kwargs)

    def token_totals(self) -> tuple[int, int]:
        """(fed, trained) summed over every process."""
        local = torch.tensor([self.tokens_fed, self.tokens_trained], dtype=torch.long, device=self.accelerator.device)
        fed, trained = (int(value) for value in self.accelerator.reduce(local, reduction="sum"))
        return fed, trained
