"""How fast a run is computed, never what it computes: defaults and fallbacks for the speed levers.

Each lever keeps the optimisation the recipe asks for (rows per step, learning rate, sequence
length, precision semantics). An explicit recipe value always wins; a lever whose package or
hardware is missing falls back, and says so, instead of failing deep inside a library.

Every step here is a decision: it reads the recipe's values and returns the keys it sets, never changing
what it reads, so the record of the run (``sftkit.setup.resolve``) is the one place they are applied.
"""

from __future__ import annotations

import importlib.util
import os
from collections import ChainMap
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from trl import SFTConfig

from sftkit import embedded
from sftkit.errors import SftkitError
from sftkit.hardware import usable_cpus
from sftkit.recipe import Decisions, setting
from sftkit.train.attention import VARLEN, varlen_available
from sftkit.train.head_loss import KERNELS, kernel_available
from sftkit.train.model import parameter_count

# The estimate below errs high (by about 1.4x against TRL's peaks measured on an H200): what it leaves
# free covers allocator fragmentation and kernels' workspaces.
CHECKPOINTING_MEMORY_FRACTION = 0.9
# The keys resolve_speed may set on the user's behalf: sftkit.train.levers proves them before step 1.
LEVERS = ("attn_implementation", "lm_head_loss", "optim", "dataloader_num_workers", "gradient_checkpointing")
HEAD_TILE_TOKENS = 4096  # tokens a logits-free head projects at once (TRL's fused head: 4,096 x 32,768 columns)


def resolve_speed(values: Mapping[str, Any], decisions: Decisions, gpu_memory: int | None) -> dict[str, Any]:
    """The speed defaults for this hardware and the replacements for levers that cannot run here: the keys to set.

    ``gpu_memory``: bytes on the CUDA GPU this process trains on, None without one. Each step reads the values with
    the steps before it applied (``view``), as the record will hold them: the mask note reads the attention chosen.
    """
    cuda = gpu_memory is not None
    config = _model_config(values) if cuda else None
    decided: dict[str, Any] = {}
    view = MappingProxyType(ChainMap(decided, values))
    if cuda and "optim" not in view:
        decided["optim"] = "adamw_torch_fused"  # the same AdamW, one kernel for all parameters
        decisions.note("speed: fused AdamW (adamw_torch_fused)")
    decided |= _resolve_attention(view, decisions, cuda, config)
    if cuda and _dense_packed_mask(view):
        side = _tokens_per_micro_step(view, config)
        decisions.note(f"speed: packed rows under sdpa attend through a dense mask of {side:,} x {side:,} tokens "
                     f"({side * side / 2**30:.1f} GiB) every micro-step; variable-length or flex attention builds none")
    decided |= _resolve_head_loss(view, decisions, cuda)
    if view.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        decided["use_liger_kernel"] = False
        decisions.note("speed: use_liger_kernel needs the liger-kernel package, which is not installed; using the "
                     "plain kernels (same results)")
    elif view.get("use_liger_kernel") and not cuda:
        decided["use_liger_kernel"] = False
        decisions.note("speed: use_liger_kernel needs a CUDA GPU (its kernels are Triton); using the plain kernels "
                     "(same results)")
    decided |= _resolve_batch_shape(view, decisions)
    if cuda:
        decided |= _resolve_data_loading(view, decisions)
        if "gradient_checkpointing" not in view and "activation_checkpointing" not in view and config:
            decided |= _resolve_checkpointing(view, decisions, gpu_memory, config)
    return decided


def _model_config(values: Mapping[str, Any]) -> Any:
    """The model's config (no weights), or None where it cannot be read: the model's own error comes later."""
    from transformers import AutoConfig

    name = values.get("model_name_or_path")
    if name is None:
        return None
    try:
        return AutoConfig.from_pretrained(embedded.resolve(name), revision=values.get("model_revision"),
                                          trust_remote_code=values.get("trust_remote_code", False))
    except (OSError, ValueError):
        return None


def _model_class(config: Any) -> type | None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # remote code or a model transformers does not map
        return None


def _attention_unavailable(attention: str, config: Any) -> str | None:
    """Why ``attention`` cannot train this model here (None: it can), by transformers' own checks.

    Import names do not tell: flash-attn-4 installs as ``flash_attn`` too, and a flash-attn 2 built for another
    torch imports but does not run. The model class says what its attention layers support.
    """
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_4_available

    model_class = _model_class(config) if config is not None else None
    # torch_varlen takes the same variable-length keyword arguments as flash attention.
    flag = "_supports_flex_attn" if attention == "flex_attention" else "_supports_flash_attn"
    if not getattr(model_class, flag, False):
        return "this model's attention layers do not support it"
    missing = {"flash_attention_2": not is_flash_attn_2_available() and "flash-attn 2 is not installed for this torch",
               "flash_attention_4": not is_flash_attn_4_available() and "flash-attn-4 is not installed",
               VARLEN: not varlen_available() and "this torch has no torch.nn.attention.varlen"}
    return missing.get(attention) or None


def _resolve_attention(values: Mapping[str, Any], decisions: Decisions, cuda: bool, config: Any) -> dict[str, Any]:
    """Packed rows get attention that keeps them apart without building a mask, where it can run."""
    attention = values.get("attn_implementation")
    packed = bool(values.get("packing"))
    if attention is None:
        if not (cuda and packed):
            return {}
        chosen = next((name for name in ("flash_attention_2", "flash_attention_4", VARLEN)
                       if _attention_unavailable(name, config) is None), None)
        if chosen is not None:
            decisions.note(f"speed: packed rows use {chosen} (variable-length attention, no mask); set "
                         "attn_implementation to choose")
            return {"attn_implementation": chosen}
        if _attention_unavailable("flex_attention", config) is None:
            decisions.note("speed: packed rows use flex_attention (a block mask, no dense mask); set "
                         "attn_implementation to choose")
            return {"attn_implementation": "flex_attention"}
        decisions.note("speed: packed rows use sdpa: this model supports neither variable-length nor flex "
                     "attention (a dense mask per batch)")
        return {}
    if attention == VARLEN and not packed:
        raise SftkitError(f"attn_implementation: {VARLEN} attends within packed sequences only: add packing: true, "
                          "or choose sdpa or flex_attention")
    if attention in ("flash_attention_2", "flash_attention_4", VARLEN, "flex_attention"):
        why = "trains on a CUDA GPU only" if not cuda else _attention_unavailable(attention, config)
        if why:
            decisions.note(f"speed: {attention}: {why}; using sdpa (same results, packed sequences still kept apart)")
            return {"attn_implementation": "sdpa"}
    return {}


def _dense_packed_mask(values: Mapping[str, Any]) -> bool:
    """Packed rows under sdpa: transformers builds a block-diagonal mask over the whole micro-step."""
    return bool(values.get("packing")) and values.get("attn_implementation", "sdpa") == "sdpa"


def _tokens_per_micro_step(values: Mapping[str, Any], config: Any) -> int:
    length = setting(values, "max_length")
    if length is None:
        length = getattr(config, "max_position_embeddings", SFTConfig.max_length)
    return setting(values, "per_device_train_batch_size") * length


def _resolve_head_loss(values: Mapping[str, Any], decisions: Decisions, cuda: bool) -> dict[str, Any]:
    """The training loss from the hidden states, the logits never built: a kernel that runs here. The trainer checks
    it against the loaded model's head (sftkit.train.head_loss) and takes an exact path where it differs."""
    asked = values.get("lm_head_loss", "auto")
    if asked in ("trl", "logits"):
        return {}
    if asked == "auto":
        # TRL's fused head keeps its entropy and accuracy logs on a CPU, where the kernels gain nothing. The first
        # kernel that runs takes the most of a head (liger and cce: a bias and a cap; torch: a bias).
        chosen = next((kernel for kernel in KERNELS if kernel_available(kernel, cuda) is None), "trl") if cuda \
            else "trl"
        if chosen != "trl":
            decisions.note(f"speed: the loss is computed by the {chosen} linear cross-entropy kernel where it "
                         "reproduces the model's head (no logits; TRL's entropy and token accuracy are not logged); "
                         "set lm_head_loss to choose")
        return {"lm_head_loss": chosen}
    if (why := kernel_available(asked, cuda)) is not None:
        decisions.note(f"speed: lm_head_loss {asked}: {why}; using TRL's fused head (lm_head_loss: trl, the same "
                     "loss, no logits either)")
        return {"lm_head_loss": "trl"}
    return {}


def _resolve_batch_shape(values: Mapping[str, Any], decisions: Decisions) -> dict[str, Any]:
    """torch.compile compiles once per batch shape: with it, every batch gets the same one."""
    unbounded = setting(values, "max_length") is None
    if values.get("fixed_batch_shape") and unbounded:
        raise SftkitError("fixed_batch_shape: true pads batches to max_length, which is null: set max_length")
    if values.get("fixed_batch_shape") is not None or not values.get("torch_compile"):
        return {}
    if unbounded:
        decisions.note("speed: torch_compile without max_length: every batch shape compiles anew")
        return {}
    decisions.note("speed: batches padded to one shape, so torch.compile compiles once (fixed_batch_shape)")
    return {"fixed_batch_shape": True}


def _resolve_data_loading(values: Mapping[str, Any], decisions: Decisions) -> dict[str, Any]:
    """Worker processes collate (and, in lazy mode, tokenize) the next batches while the GPU computes."""
    if "dataloader_num_workers" in values:
        return {}
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = max(1, min(4, usable_cpus() // processes_here - 1))
    decided: dict[str, Any] = {"dataloader_num_workers": workers}
    if "dataloader_persistent_workers" not in values:
        decided["dataloader_persistent_workers"] = True  # not forked again for every epoch and eval
    decisions.note(f"speed: {workers} data-loading worker(s) per process")
    return decided


def _resolve_checkpointing(values: Mapping[str, Any], decisions: Decisions, gpu_memory: int,
                           config: Any) -> dict[str, Any]:
    """No activation recomputation (a third more compute) when the run fits in GPU memory without it."""
    tokens = _tokens_per_micro_step(values, config)
    try:
        estimate = training_memory_estimate(config, tokens, **_precision(values),
                                            dense_mask=_dense_packed_mask(values))
    except (ValueError, AttributeError):  # a config transformers cannot build: the model's own error comes later
        return {}
    needed = estimate > CHECKPOINTING_MEMORY_FRACTION * gpu_memory
    decisions.note(f"speed: gradient checkpointing {'on' if needed else 'off'}: training needs about "
                 f"{estimate / 2**30:.1f} GiB without it, of this GPU's {gpu_memory / 2**30:.1f} GiB; set "
                 "gradient_checkpointing to choose")
    return {"gradient_checkpointing": needed}


def _precision(values: Mapping[str, Any]) -> dict[str, bool]:
    half_weights = values.get("dtype") in ("bfloat16", "float16")
    return {"fp32_master_weights": not half_weights,
            "half_activations": half_weights or bool(values.get("bf16") or values.get("fp16"))}


def training_memory_estimate(config: Any, tokens: int, fp32_master_weights: bool, half_activations: bool,
                             dense_mask: bool = False) -> int:
    """Bytes a full fine-tuning step needs on one device with every activation kept, erring high.

    Weights, gradients and AdamW's two moments: 16 bytes a parameter with fp32 master weights (18 under
    autocast, which keeps 16-bit copies), 8 in pure 16-bit. Activations kept for the backward pass: about
    9 x hidden + 4 x intermediate values a token and layer, 4 bytes each in fp32, 3 in mixed precision (the
    residual stream and norms stay fp32). The LM head builds no logits (TRL's fused head or sftkit's
    kernels): it keeps the last hidden states and their gradient, 12 bytes a hidden value a token, and
    projects at most HEAD_TILE_TOKENS tokens at a time, a tile of logits and their gradient in fp32.
    Packed rows under sdpa (``dense_mask``) add a boolean mask of tokens x tokens.
    tests/test_speed_defaults.py holds these terms against the tensors autograd really keeps.
    Sharded states (ZeRO, FSDP) and adapters (PEFT) need less, so the estimate errs towards checkpointing.
    """

    parameters = parameter_count(config)
    text = config.get_text_config()
    states = parameters * ((18 if half_activations else 16) if fp32_master_weights else 8)
    per_token_and_layer = (9 * text.hidden_size + 4 * text.intermediate_size) * (3 if half_activations else 4)
    activations = tokens * text.num_hidden_layers * per_token_and_layer
    head = tokens * text.hidden_size * 12 + min(tokens, HEAD_TILE_TOKENS) * text.vocab_size * 8
    return states + activations + head + (tokens * tokens if dense_mask else 0)
