"""The end-of-run summary: what was trained, how fast, how the loss moved, and what was written where."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class TrainedTokenCounter:
    """Wraps the trainer's collator to count the tokens that carry loss and the tokens fed in."""

    def __init__(self, collator: Callable[[list], dict[str, Any]]) -> None:
        self.collator = collator
        self.trained = 0
        self.seen = 0

    def __call__(self, examples: list) -> dict[str, Any]:
        batch = self.collator(examples)
        labels = batch["labels"]
        self.trained += int((labels[..., 1:] != -100).sum())
        mask = batch.get("attention_mask")
        self.seen += int(mask.sum()) if mask is not None else labels.numel()
        return batch


def _losses(log_history: list[dict[str, Any]], key: str) -> tuple[float | None, float | None]:
    values = [entry[key] for entry in log_history if key in entry]
    return (values[0], values[-1]) if values else (None, None)


def summarise(trainer: Any, counter: TrainedTokenCounter, written: dict[str, str]) -> str:
    """A few lines for the terminal; token counts are summed over every process."""
    totals = torch.tensor([counter.trained, counter.seen], dtype=torch.long, device=trainer.accelerator.device)
    trained, seen = (int(value) for value in trainer.accelerator.reduce(totals, reduction="sum"))
    history = trainer.state.log_history
    runtime = next((entry["train_runtime"] for entry in reversed(history) if "train_runtime" in entry), None)
    first, last = _losses(history, "loss")
    eval_first, eval_last = _losses(history, "eval_loss")
    lines = [f"steps          {trainer.state.global_step}"]
    lines.append(f"tokens         {trained:,} trained of {seen:,} fed")
    if runtime:
        lines.append(f"throughput     {seen / runtime:,.0f} tokens/s over {runtime:.1f} s")
    if first is not None:
        lines.append(f"train loss     {first:.4f} (first step) -> {last:.4f} (last step)")
    if eval_first is not None:
        lines.append(f"held-out loss  {eval_first:.4f} (first eval) -> {eval_last:.4f} (last eval)")
    lines += [f"{label:<14} {path}" for label, path in written.items()]
    return "\n".join(lines)
