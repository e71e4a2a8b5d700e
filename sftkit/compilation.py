"""One batch shape for a whole run, so torch.compile compiles the model once instead of once per packed shape."""

from __future__ import annotations

from typing import Any

import torch

PADDING_KEY = "sftkit_padding"  # tokens added to reach the fixed shape, taken out of the token counts


class FixedShapeCollator:
    """Pads each padding-free (packed) batch to a multiple of ``tokens`` with one extra sequence the loss ignores.

    The padding is its own sequence (positions restart at 0 and count up), so no real sequence attends to it,
    and its labels are -100. ``tokens`` is per_device_train_batch_size x max_length, the most a training batch
    of packed rows can hold: every training batch gets exactly that shape.
    """

    def __init__(self, collate: Any, tokens: int, pad_token_id: int) -> None:
        self.collate = collate
        self.tokens = tokens
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        length = batch["input_ids"].shape[1]
        padding = -length % self.tokens
        batch[PADDING_KEY] = torch.tensor(padding)
        if not padding:
            return batch
        batch["input_ids"] = _extend(batch["input_ids"], torch.full((padding,), self.pad_token_id))
        batch["labels"] = _extend(batch["labels"], torch.full((padding,), -100))
        batch["position_ids"] = _extend(batch["position_ids"], torch.arange(padding))
        if "cu_seq_lens_q" in batch:  # the sequence boundaries TRL hands to varlen kernels
            boundaries = torch.cat([batch["cu_seq_lens_q"], torch.tensor([length + padding], dtype=torch.int32)])
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = boundaries
            batch["max_length_q"] = batch["max_length_k"] = max(batch["max_length_q"], padding)
        if "seq_idx" in batch:
            next_index = int(batch["seq_idx"].max()) + 1
            batch["seq_idx"] = _extend(batch["seq_idx"], torch.full((padding,), next_index, dtype=torch.int32))
        return batch


def _extend(row: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    return torch.cat([row, tail.to(row.dtype).unsqueeze(0)], dim=1)


def fix_batch_shape(collator: Any, max_length: int, per_device_batch: int, pad_token_id: int) -> Any:
    """The collator to train with when every batch must have one shape."""
    if getattr(collator, "padding_free", False):
        return FixedShapeCollator(collator, per_device_batch * max_length, pad_token_id)
    collator.pad_to_multiple_of = max_length  # rows padded to max_length; the attention mask excludes the padding
    return collator
