"""What a batch holds, counted on the CPU where it is collated (in the data-loading workers), never on the GPU.

Counting tokens on the device means an ``int(tensor)`` every micro-step: the host waits for the GPU
and cannot queue the next kernels. The collator already has the batch on the CPU, so the counts travel
with the batch as plain integers, and the positions the head loss projects as a CPU tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sftkit.data.tokenization import IGNORE
from sftkit.train.batches import facts
from sftkit.train.head_loss import label_positions


class CountingCollator:
    """Adds the batch's token counts (and, for the head loss, its trained positions) to what ``collate`` makes."""

    def __init__(self, collate: Callable[[list], dict[str, Any]], positions: bool) -> None:
        self.collate = collate
        self.positions = positions

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        labels, mask = batch["labels"], batch.get("attention_mask")
        counted = facts(batch)
        counted.tokens_fed = int(mask.sum()) if mask is not None else labels.numel()
        counted.tokens_trained = int((labels[:, 1:] != IGNORE).sum())
        if self.positions:
            counted.label_positions = label_positions(labels)
        return batch
