"""What sftkit's collators add to a batch beside the model's inputs: one typed value under one key.

The collators run on the CPU (in the data-loading workers), where counting costs the GPU nothing; the trainer
takes the value out of the batch before the model sees it (``take_facts``), in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

FACTS_KEY = "sftkit_facts"


@dataclass
class BatchFacts:
    """``tokens_fed``: tokens the model reads (padding left out); ``tokens_trained``: tokens whose next-token label is
    trained; ``label_positions``: their flat indices, for the head loss (a CPU tensor); ``invalid``: the
    skipped-rows entries of invalid rows met as the batch was prepared; ``rows_drawn``: how many rows it drew,
    valid or not; ``row_ids``: the ids of the rows it trains on (a packed sequence's, too)."""

    tokens_fed: int = 0
    tokens_trained: int = 0
    label_positions: torch.Tensor | None = None
    invalid: list[dict[str, Any]] = field(default_factory=list)
    rows_drawn: int | None = None
    row_ids: list[int] = field(default_factory=list)


def facts(batch: dict[str, Any]) -> BatchFacts:
    """The batch's facts, added to it if it has none yet (each collator fills in its own)."""
    return batch.setdefault(FACTS_KEY, BatchFacts())


def take_facts(inputs: dict[str, Any]) -> BatchFacts:
    """The facts taken out of a batch about to reach the model; an empty record for a batch without them."""
    return inputs.pop(FACTS_KEY, None) or BatchFacts()
