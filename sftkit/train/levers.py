"""The speed levers proven before step 1: one forward and backward pass on a real batch, with the levers in effect.

sftkit's GPU defaults (variable-length or flex attention, a head-loss kernel, fused AdamW, data-loading workers,
no activation recomputation) have not met every card, driver and container a user has. Before the first step,
the run takes one batch through the data loader, the model's forward and backward pass, and one fused AdamW step
on a scratch tensor. A lever sftkit chose (or a library's default) that fails there (a kernel that does not run on this card, workers
killed by a small /dev/shm, an out-of-memory without recomputation) is dropped for the plain path, with a warning
that names it and how to pin it; a lever the recipe asked for fails the run with the error it met. The processes
agree on what they drop, so that all of them train alike.

Under ZeRO-3 and FSDP the model is sharded only when training starts, so no pass can run before it: there the
levers are not proven, the log says so, and a lever that fails stops the run at its first step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers.integrations import is_deepspeed_zero3_enabled

from sftkit.errors import SftkitError
from sftkit.recipe import Recipe
from sftkit.train.head_loss import KERNELS

logger = logging.getLogger(__name__)

# Each lever's plain setting: what it falls back to, and what costs nothing to prove.
PLAIN = {"attn_implementation": "sdpa", "lm_head_loss": "trl", "optim": "adamw_torch", "dataloader_num_workers": 0,
         "gradient_checkpointing": True}


def in_effect(recipe: Recipe) -> dict[str, Any]:
    """The levers set to something other than their plain setting, by the recipe or by sftkit."""
    optim = str(getattr(recipe.training.optim, "value", recipe.training.optim))
    settings = {"attn_implementation": recipe.model.attn_implementation or "sdpa",
                "lm_head_loss": recipe.sftkit.lm_head_loss, "optim": optim if "fused" in optim else PLAIN["optim"],
                "dataloader_num_workers": recipe.training.dataloader_num_workers,
                "gradient_checkpointing": recipe.training.gradient_checkpointing}
    return {lever: value for lever, value in settings.items()
            if value != PLAIN[lever] and not (lever == "attn_implementation" and value == "eager")}


def prove_levers(trainer: Any, recipe: Recipe) -> list[str]:
    """Run the proof; drop the chosen levers that fail it (on every process), fail on an asked-for one. Returns the
    levers dropped."""
    levers = in_effect(recipe)
    if trainer.head_loss not in KERNELS:  # the model's head took an exact path of its own: no kernel to prove
        levers.pop("lm_head_loss", None)
    if not levers:
        return []
    if is_deepspeed_zero3_enabled() or trainer.is_fsdp_enabled:
        logger.info("speed: the levers (%s) are not proven before step 1 under ZeRO-3 or FSDP, which shard the model "
                    "only when training starts; one that fails here stops the run at step 1",
                    ", ".join(f"{lever} {value}" for lever, value in levers.items()))
        return []
    dropped: list[str] = []
    while True:
        try:
            _one_step(trainer)
            break
        except Exception as error:
            lever = _suspect(levers, dropped, error)
            if lever is None:
                raise
            if lever in recipe.values and lever not in recipe.chosen_levers:
                raise SftkitError(f"{lever}: {levers[lever]} (as the recipe says) fails on this machine before the "
                                  f"first step: {type(error).__name__}: {_first_line(error)}. Remove it from the "
                                  f"recipe or choose another value.") from None
            # Not the recipe's choice: sftkit's for this machine, or the library's default (TRL's optim is fused AdamW).
            chooser = "sftkit chose for this machine" if lever in recipe.chosen_levers else "is the default"
            dropped.append(lever)
            logger.warning("speed: %s %s, which %s, fails here before the first step (%s: %s); it is dropped for %s. "
                           "Set %s in the recipe to choose.", lever, levers[lever], chooser, type(error).__name__,
                           _first_line(error), PLAIN[lever], lever)
            DROP[lever](trainer)
    if trainer.accelerator.num_processes > 1:  # what any process dropped, every process drops
        everywhere = sorted({lever for part in gather_object([dropped]) for lever in part})
        for lever in everywhere:
            if lever not in dropped:
                DROP[lever](trainer)
        dropped = everywhere
    return dropped


def _first_line(error: BaseException) -> str:
    line = (str(error).strip().splitlines() or [""])[0]
    return line if len(line) <= 160 else line[:157] + "..."


def _suspect(levers: dict[str, Any], dropped: list[str], error: BaseException) -> str | None:
    """The lever most likely behind ``error`` that is still in effect: recomputation for an out-of-memory, the
    data loader's workers for a worker's death, else the kernels, attention first."""
    remaining = [lever for lever in levers if lever not in dropped]
    if isinstance(error, torch.cuda.OutOfMemoryError):
        order = ["gradient_checkpointing"]
    elif "DataLoader worker" in str(error) or "shared memory" in str(error):
        order = ["dataloader_num_workers"]
    else:
        order = ["attn_implementation", "lm_head_loss", "optim", "dataloader_num_workers"]
    return next((lever for lever in order if lever in remaining), None)


def _one_step(trainer: Any) -> None:
    """One batch through the data loader, forward and backward; one fused AdamW step if the recipe uses it."""
    try:
        trainer.trial_step()  # the proof is not training: nothing of it is counted, listed or watched
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "fused" in str(getattr(trainer.args.optim, "value", trainer.args.optim)):
        scratch = torch.zeros(8, device=trainer.args.device, requires_grad=True)
        scratch.grad = torch.ones_like(scratch)
        torch.optim.AdamW([scratch], fused=True).step()


def _drop_attention(trainer: Any) -> None:
    trainer.model.set_attn_implementation(PLAIN["attn_implementation"])


def _drop_head_loss(trainer: Any) -> None:
    trainer.head_loss = trainer.exact_fallback()  # TRL's head where it reproduces the model's, else its own logits
    trainer.head_loss_why = "the kernel failed on this machine before the first step"
    if trainer.head_loss is not None:
        logger.warning("speed: TRL's fused head does not reproduce this model's head either (%s): the loss is "
                       "computed from the model's own logits", trainer.head.trl_differs)


def _drop_fused_optimizer(trainer: Any) -> None:
    trainer.args.optim = PLAIN["optim"]


def _drop_workers(trainer: Any) -> None:
    trainer.args.dataloader_num_workers = 0
    trainer.args.dataloader_persistent_workers = False


def _drop_no_recomputation(trainer: Any) -> None:
    trainer.args.gradient_checkpointing = True
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)


DROP: dict[str, Callable[[Any], None]] = {
    "attn_implementation": _drop_attention, "lm_head_loss": _drop_head_loss, "optim": _drop_fused_optimizer,
    "dataloader_num_workers": _drop_workers, "gradient_checkpointing": _drop_no_recomputation,
}
