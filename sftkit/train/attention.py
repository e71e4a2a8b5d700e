"""Attention for training: flex in the autocast dtype, and torch's variable-length kernel for packed rows.

Autocast casts sdpa's inputs to bf16, but flex attention is not an autocast op: with fp32 master
weights, the rotary embedding hands it fp32 queries and keys beside bf16 values, and it then computes
in fp32. Casting its inputs as autocast would keeps mixed precision's numerics (those of sdpa there)
and the speed flex attention is chosen for.

``torch_varlen`` attends within each packed sequence with ``torch.nn.attention.varlen.varlen_attn``
(FlashAttention kernels that ship inside torch, CUDA only): no mask is built at all, dense or block,
because the sequence boundaries TRL's padding-free collator computes on the CPU are handed to it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward

from sftkit.errors import SftkitError

VARLEN = "torch_varlen"  # the attn_implementation name sftkit registers


def _in_autocast_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(tensor.to(dtype) for tensor in tensors)


def flex_attention_in_autocast_dtype(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                     value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:
    query, key, value = _in_autocast_dtype(query, key, value)
    return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_flex_attention_in_autocast_dtype() -> None:
    """Models loaded with attn_implementation flex_attention use the casting version from now on."""
    AttentionInterface.register("flex_attention", flex_attention_in_autocast_dtype)


def varlen_available() -> bool:
    """Whether this torch has the variable-length attention API (torch 2.10 and later)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _torch_varlen_kernel() -> Callable[..., torch.Tensor]:
    """torch's varlen_attn, called the same way whichever of its signatures this torch has."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    native_gqa = "enable_gqa" in parameters

    def kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, boundaries: torch.Tensor,
               longest: int, scale: float) -> torch.Tensor:
        if native_gqa:
            extra = {"enable_gqa": key.shape[1] != query.shape[1]}
        else:  # older torch: every query head gets its own copy of its key and value head
            groups = query.shape[1] // key.shape[1]
            key, value, extra = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), {}
        return varlen_attn(query, key, value, boundaries, boundaries, longest, longest, scale=scale,
                           **causal, **extra)

    return kernel


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Any, *, scaling: float | None = None,
                             kernel: Callable[..., torch.Tensor] | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface over a variable-length kernel: (1, heads, tokens, dim) in and
    (1, tokens, heads, dim) out, causal within each packed sequence.

    ``kernel(query, key, value, boundaries, longest, scale)`` takes (tokens, heads, dim) tensors and the
    cumulative sequence boundaries; torch's varlen_attn unless given (the CPU tests give a reference one).
    """
    boundaries, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if boundaries is None or query.shape[0] != 1:
        raise SftkitError(f"attn_implementation {VARLEN} attends within packed sequences and needs padding-free "
                          "batches (packing: true); use sdpa or flex_attention for anything else")
    query, key, value = _in_autocast_dtype(query, key, value)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    output = (kernel or _torch_varlen_kernel())(query[0].transpose(0, 1), key[0].transpose(0, 1),
                                                value[0].transpose(0, 1), boundaries.to(torch.int32),
                                                int(longest), scale)
    return output.unsqueeze(0), None


def use_varlen_attention() -> None:
    """Models loaded with attn_implementation torch_varlen attend through torch's variable-length kernel.

    The name is not in transformers' mask functions, so the model builds no mask for it.
    """
    AttentionInterface.register(VARLEN, varlen_attention_forward)
