"""Flex attention under autocast computes in the autocast dtype, as sdpa does.

Autocast casts sdpa's inputs to bf16, but flex attention is not an autocast op: with fp32 master
weights, the rotary embedding hands it fp32 queries and keys beside bf16 values, and it then computes
in fp32. Casting its inputs as autocast would keeps mixed precision's numerics (those of sdpa there)
and the speed flex attention is chosen for.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward


def flex_attention_in_autocast_dtype(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                     value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_flex_attention_in_autocast_dtype() -> None:
    """Models loaded with attn_implementation flex_attention use the casting version from now on."""
    AttentionInterface.register("flex_attention", flex_attention_in_autocast_dtype)
