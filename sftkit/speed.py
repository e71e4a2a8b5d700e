"""How fast a run is computed, never what it computes: defaults and fallbacks for the speed levers.

Each lever keeps the optimisation the recipe asks for (rows per step, learning rate, sequence
length, precision semantics). An explicit recipe value always wins; a lever whose package or
hardware is missing falls back, and says so, instead of failing deep inside a library.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from trl import SFTConfig

from sftkit import embedded
from sftkit.errors import SftkitError

# The estimate below errs high (by about 1.5x against TRL's peaks measured on an H200 in ../shared/gpu):
# what it leaves free covers allocator fragmentation and kernels' workspaces.
CHECKPOINTING_MEMORY_FRACTION = 0.9


def resolve_speed(values: dict[str, Any], notes: list[str], gpu_memory: int | None) -> None:
    """Fill the speed defaults for this hardware and replace levers that cannot run here.

    ``gpu_memory``: bytes on the CUDA GPU this process trains on, None without one.
    """
    cuda = gpu_memory is not None
    if cuda and "optim" not in values:
        values["optim"] = "adamw_torch_fused"  # the same AdamW, one kernel for all parameters
        notes.append("speed: fused AdamW (adamw_torch_fused)")
    _resolve_attention(values, notes, cuda)
    if values.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        values["use_liger_kernel"] = False
        notes.append("speed: use_liger_kernel needs the liger-kernel package, which is not installed; using the "
                     "plain kernels (same results)")
    elif values.get("use_liger_kernel") and not cuda:
        values["use_liger_kernel"] = False
        notes.append("speed: use_liger_kernel needs a CUDA GPU (its kernels are Triton); using the plain kernels "
                     "(same results)")
    _resolve_batch_shape(values, notes)
    if cuda:
        _resolve_data_loading(values, notes)
        if "gradient_checkpointing" not in values and "activation_checkpointing" not in values:
            _resolve_checkpointing(values, notes, gpu_memory)


def _resolve_attention(values: dict[str, Any], notes: list[str], cuda: bool) -> None:
    """Packed rows get attention that keeps them apart without materialising a dense mask where it can run."""
    attention = values.get("attn_implementation")
    if attention is None and cuda and values.get("packing"):
        flash = importlib.util.find_spec("flash_attn") is not None
        values["attn_implementation"] = "flash_attention_2" if flash else "flex_attention"
        notes.append(f"speed: packed rows use {values['attn_implementation']} (variable-length attention, no "
                     "dense mask); set attn_implementation to choose")
    elif attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        values["attn_implementation"] = "sdpa"
        notes.append("speed: attn_implementation flash_attention_2 needs the flash-attn package, which is not "
                     "installed; using sdpa (same results, packed sequences still kept apart)")
    elif attention == "flex_attention" and not cuda:
        values["attn_implementation"] = "sdpa"
        notes.append("speed: flex_attention trains on a CUDA GPU only; using sdpa (same results)")


def _resolve_batch_shape(values: dict[str, Any], notes: list[str]) -> None:
    """torch.compile compiles once per batch shape: with it, every batch gets the same one."""
    unbounded = values.get("max_length", SFTConfig.max_length) is None
    if values.get("fixed_batch_shape") and unbounded:
        raise SftkitError("fixed_batch_shape: true pads batches to max_length, which is null: set max_length")
    if values.get("fixed_batch_shape") is None and values.get("torch_compile"):
        if unbounded:
            notes.append("speed: torch_compile without max_length: every batch shape compiles anew")
        else:
            values["fixed_batch_shape"] = True
            notes.append("speed: batches padded to one shape, so torch.compile compiles once (fixed_batch_shape)")


def _resolve_data_loading(values: dict[str, Any], notes: list[str]) -> None:
    """Worker processes collate (and, in lazy mode, tokenize) the next batches while the GPU computes."""
    if "dataloader_num_workers" in values:
        return
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = max(1, min(4, (os.cpu_count() or 1) // processes_here - 1))
    values["dataloader_num_workers"] = workers
    values.setdefault("dataloader_persistent_workers", True)  # not forked again for every epoch and eval
    notes.append(f"speed: {workers} data-loading worker(s) per process")


def _resolve_checkpointing(values: dict[str, Any], notes: list[str], gpu_memory: int) -> None:
    """No activation recomputation (a third more compute) when the run fits in GPU memory without it."""
    from transformers import AutoConfig

    name = values.get("model_name_or_path")
    if name is None:
        return
    try:
        config = AutoConfig.from_pretrained(embedded.resolve(name), revision=values.get("model_revision"),
                                            trust_remote_code=values.get("trust_remote_code", False))
        tokens = (values.get("per_device_train_batch_size", SFTConfig.per_device_train_batch_size)
                  * (values.get("max_length", SFTConfig.max_length) or config.max_position_embeddings))
        estimate = training_memory_estimate(config, tokens, **_precision(values))
    except (OSError, ValueError, AttributeError):  # the model's own error comes, clearer, when it is loaded
        return
    needed = estimate > CHECKPOINTING_MEMORY_FRACTION * gpu_memory
    values["gradient_checkpointing"] = needed
    notes.append(f"speed: gradient checkpointing {'on' if needed else 'off'}: training needs about "
                 f"{estimate / 2**30:.1f} GiB without it, of this GPU's {gpu_memory / 2**30:.1f} GiB; set "
                 "gradient_checkpointing to choose")


def _precision(values: dict[str, Any]) -> dict[str, bool]:
    half_weights = values.get("dtype") in ("bfloat16", "float16")
    return {"fp32_master_weights": not half_weights,
            "half_activations": half_weights or bool(values.get("bf16") or values.get("fp16"))}


def training_memory_estimate(config: Any, tokens: int, fp32_master_weights: bool, half_activations: bool) -> int:
    """Bytes a full fine-tuning step needs on one device with every activation kept, erring high.

    Weights, gradients and AdamW's two moments: 16 bytes a parameter with fp32 master weights (18 under
    autocast, which keeps 16-bit copies), 8 in pure 16-bit. Activations kept for the backward pass: about
    9 x hidden + 4 x intermediate values a token and layer, 4 bytes each in fp32, 3 in mixed precision (the
    residual stream and norms stay fp32). The LM head: the logits, their fp32 copy for the loss and its
    gradient, 12 bytes a vocabulary row a token (16 in fp32). tests/test_speed_defaults.py holds the
    activation and head terms against the tensors autograd really keeps.
    Sharded states (ZeRO, FSDP) and adapters (PEFT) need less, so the estimate errs towards checkpointing.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    text = config.get_text_config()
    states = parameters * ((18 if half_activations else 16) if fp32_master_weights else 8)
    per_token_and_layer = (9 * text.hidden_size + 4 * text.intermediate_size) * (3 if half_activations else 4)
    activations = tokens * text.num_hidden_layers * per_token_and_layer
    head = tokens * text.vocab_size * (12 if half_activations else 16)
    return states + activations + head
