"""torch.compile for a training run: each decoder layer compiled in place, and one batch shape for the whole run.

Compiling the whole model puts mask construction (flex attention's block mask, built per batch) inside
the compiled graph and takes minutes for 24 layers; compiling each decoder layer compiles one layer's
code once for all of them, and the mask is built outside. One batch shape means one compilation.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import DynamoBackend

from sftkit.data.tokenization import IGNORE


class FixedShapeCollator:
    """Pads each padding-free (packed) batch to a multiple of ``tokens`` with one extra sequence the loss ignores.

    The padding is its own sequence (positions restart at 0 and count up), so no real sequence attends to it,
    and its labels are -100; it comes after the real tokens, which are counted before it is added. ``tokens``
    is per_device_train_batch_size x max_length, the most a training batch of packed rows can hold: every
    training batch gets exactly that shape.
    """

    def __init__(self, collate: Any, tokens: int, pad_token_id: int) -> None:
        self.collate = collate
        self.tokens = tokens
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        length = batch["input_ids"].shape[1]
        padding = -length % self.tokens
        if not padding:
            return batch
        batch["input_ids"] = _extend(batch["input_ids"], torch.full((padding,), self.pad_token_id))
        batch["labels"] = _extend(batch["labels"], torch.full((padding,), IGNORE))
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


def compile_decoder_layers(model: torch.nn.Module, dynamo_plugin: Any) -> int:
    """Compile each decoder layer of ``model`` in place with the trainer's compile settings; returns how many.

    In place, so the model object the trainer and its wrappers (DDP, DeepSpeed, FSDP) hold is the one that
    runs, and accelerate is told not to compile the whole model again.
    """
    settings = dynamo_plugin.to_kwargs()
    dynamo_plugin.backend = DynamoBackend.NO
    layers = [module for module in model.modules() if type(module).__name__ in (model._no_split_modules or ())]
    for layer in layers:
        layer.compile(**settings)
    return len(layers)
