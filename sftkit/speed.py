"""How fast a run is computed, never what it computes: defaults and fallbacks for the speed levers.

Each lever keeps the optimisation the recipe asks for (rows per step, learning rate, sequence
length, precision semantics). An explicit recipe value always wins; a lever whose package or
hardware is missing falls back, and says so, instead of failing deep inside a library.
"""

from __future__ import annotations

import importlib.util
from typing import Any


def resolve_speed(values: dict[str, Any], notes: list[str], cuda: bool) -> None:
    """Fill the speed defaults for this hardware and replace levers that cannot run here."""
    if cuda and "optim" not in values:
        values["optim"] = "adamw_torch_fused"  # the same AdamW, one kernel for all parameters
        notes.append("speed: fused AdamW (adamw_torch_fused)")
    attention = values.get("attn_implementation")
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        values["attn_implementation"] = "sdpa"
        notes.append("speed: attn_implementation flash_attention_2 needs the flash-attn package, which is not "
                     "installed; using sdpa (same results, packed sequences still kept apart)")
    elif attention == "flex_attention" and not cuda:
        values["attn_implementation"] = "sdpa"
        notes.append("speed: flex_attention needs a CUDA GPU here; using sdpa (same results)")
    if values.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        values["use_liger_kernel"] = False
        notes.append("speed: use_liger_kernel needs the liger-kernel package, which is not installed; using the "
                     "plain kernels (same results)")
