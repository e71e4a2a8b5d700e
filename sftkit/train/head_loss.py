"""The training loss straight from the last hidden states: the 150k-wide logits are never built.

A causal LM's head projects every token onto the whole vocabulary (151,936 columns for Qwen2.5);
materialising those logits, their fp32 copy and their gradient costs more memory than the rest of a
small model's activations. TRL's own fused head already avoids that and also computes entropy and
top-1 accuracy for its logs (``lm_head_loss: trl``). The kernels here compute the loss alone:

- ``liger``: Liger's fused linear cross-entropy, gradients accumulated in fp32; CUDA only;
- ``cce``: Apple's cut-cross-entropy, exact (no gradient filtering); CUDA only;
- ``torch``: ``torch.nn.functional.linear_cross_entropy`` with its chunked path (torch 2.13 and later).

Only the positions whose next token is trained are projected: the collator lists them on the CPU
(``LABEL_POSITIONS``), so selecting them costs the GPU no synchronisation. The sum over them is
divided by the tokens of the whole optimizer step, exactly as TRL's loss is, so the optimisation is
the same whichever kernel computes it.
"""

from __future__ import annotations

import functools
import importlib.util
import types
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from sftkit.data.tokenization import IGNORE

LABEL_POSITIONS = "sftkit_label_positions"  # flat indices of the positions whose next-token label is trained
KERNELS = ("liger", "cce", "torch")  # auto takes the first that runs here

SumOfLosses = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def torch_chunked_available() -> bool:
    """torch's linear_cross_entropy with a chunked path (LinearCrossEntropyOptions: torch 2.13 and later)."""
    return hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def kernel_available(kernel: str, cuda: bool) -> str | None:
    """None when ``kernel`` can run here; else why not."""
    if kernel == "torch":
        return None if torch_chunked_available() else f"torch {torch.__version__} has no chunked linear_cross_entropy"
    package = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}[kernel]
    if importlib.util.find_spec(package) is None:
        return f"the {package.replace('_', '-')} package is not installed"
    return None if cuda else "its kernels are Triton, CUDA only"


def sum_of_losses(kernel: str) -> SumOfLosses:
    """``f(hidden (n, d), weight (vocab, d), targets (n,))`` -> the summed cross-entropy of the n tokens."""
    if kernel == "torch":
        options = torch.nn.LinearCrossEntropyOptions()

        def summed(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            # Per token, summed here in fp32: its own sum of bf16 inputs comes back rounded to bf16 (about 1% off).
            losses = torch.nn.functional.linear_cross_entropy(hidden, weight, targets, reduction="none",
                                                              options=options)
            return losses.float().sum()

        return summed
    if kernel == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return functools.partial(linear_cross_entropy, reduction="sum", filter_eps=None)  # exact gradients
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return functools.partial(liger_fused_linear_cross_entropy, reduction="sum", accum_dtype=torch.float32)


def add_head_loss(model: torch.nn.Module, kernel: str) -> None:
    """Let ``model(..., sftkit_head_loss=True)`` return the summed loss of the listed positions, logits unbuilt.

    The loss runs inside the model's forward, so wrappers (DDP, DeepSpeed, FSDP, PEFT) see a normal call.
    Without the flag the forward is the one the model had (TRL's fused head included).
    """
    loss = sum_of_losses(kernel)
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self: torch.nn.Module, *args: Any, sftkit_head_loss: bool = False, **kwargs: Any) -> Any:
        if not sftkit_head_loss:
            return previous(*args, **kwargs)
        labels, positions = kwargs.pop("labels"), kwargs.pop(LABEL_POSITIONS)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        weight = self.get_output_embeddings().weight
        if isinstance(weight, DTensor):  # FSDP2 shards the head: gather it for the loss
            weight = weight.full_tensor()
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        targets = labels[:, 1:].reshape(-1).index_select(0, positions)
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # the projection in the autocast dtype, as autocast runs the head
            dtype = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(device, enabled=False):  # the kernels accumulate in fp32 themselves
            return loss(hidden, weight, targets)

    model.forward = types.MethodType(forward, model)


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices, over ``labels[:, 1:]``, of the positions whose next-token label is trained (on the CPU)."""
    return (labels[:, 1:].reshape(-1) != IGNORE).nonzero().squeeze(1)
