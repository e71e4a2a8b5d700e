"""Resolving a checked recipe for this machine and launcher: environment, device, precision, speed defaults,
batch geometry and the launcher's config. What sftkit decides on the user's behalf is returned as notes, gathered
in one ``Decisions`` that also names the recipe in every error.

The recipe as read (``sftkit.recipe.read_recipe``) is left as it was: each decision (device, precision, speed)
reads the values decided so far, read-only, and returns the keys it sets; ``resolve`` applies them, in order, to
the record of the run and returns a new Recipe. Resolving does change the process's environment where libraries
read it: the recipe's ``env:`` mapping, and the precision the launcher must not override.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig

from sftkit.errors import SftkitError
from sftkit.hardware import bf16_supported, gpu_count, gpu_memory, has_accelerator
from sftkit.recipe import (
    CheckedRecipe,
    Decisions,
    Recipe,
    SftkitArguments,
    batch_geometry,
    number_of_processes,
    read_recipe,
    setting,
)
from sftkit.setup.launcher import reconcile_launcher
from sftkit.setup.speed import LEVERS, resolve_speed
from sftkit.train.checkpoints import check_resume, resolve_resume

# The classes a resolved recipe is built into, each taking the keys it declares (sftkit.recipe_keys reads TRL's).
RECIPE_CLASSES = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, SftkitArguments)

# Environment variables libraries read once, when they are imported: a recipe's env: sets them too late unless it is
# applied before those imports (the sftkit command does so).
IMPORT_TIME_ENV = {
    "HF_HOME": "huggingface_hub", "HF_HUB_CACHE": "huggingface_hub", "HF_HUB_OFFLINE": "huggingface_hub",
    "HF_ENDPOINT": "huggingface_hub", "HF_DATASETS_CACHE": "datasets", "HF_DATASETS_OFFLINE": "datasets",
    "TRANSFORMERS_CACHE": "transformers", "TRANSFORMERS_OFFLINE": "transformers",
}


def resolve_device(values: Mapping[str, Any], decisions: Decisions) -> dict[str, Any]:
    """On a machine without an accelerator, train on the CPU, with several processes as gloo DDP. Several GPUs
    without a launcher would run nn.DataParallel in one process, which sftkit's batch arithmetic does not describe:
    that stops with the command that uses them all."""
    decided: dict[str, Any] = {}
    if "use_cpu" not in values and not has_accelerator():
        decided["use_cpu"] = True
        decisions.note("device: CPU (no GPU found; several processes would run DDP over gloo)")
    gpus = gpu_count()
    if gpus > 1 and "WORLD_SIZE" not in os.environ and not decided.get("use_cpu", values.get("use_cpu")):
        raise SftkitError(
            f"this machine has {gpus} GPUs and no launcher started this run, which would train on them as one process "
            "(nn.DataParallel) with another batch than the recipe says. Start it with\n"
            f"  accelerate launch --multi_gpu --num_processes {gpus} -m sftkit --config {decisions.recipe_path}\n"
            "or choose one GPU with CUDA_VISIBLE_DEVICES=0."
        )
    return decided


def resolve_precision(values: Mapping[str, Any], decisions: Decisions) -> dict[str, bool]:
    """bf16 mixed precision where the hardware has it, else fp32; explicit settings win; the launcher never does."""
    import torch

    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if "bf16" in values or "fp16" in values:
        chosen = "bf16" if values.get("bf16") else "fp16" if values.get("fp16") else "no"
        reason = "as the recipe says"
        if chosen == "fp16" and not torch.cuda.is_available():
            raise decisions.error("fp16: true needs a CUDA GPU; on this machine leave precision unset")
    else:
        on_cpu = values.get("use_cpu", False)
        chosen = "bf16" if bf16_supported() and not on_cpu else "no"
        reason = "the hardware supports bf16" if chosen == "bf16" else "no bf16-capable GPU"
    if launcher is not None and launcher != chosen:
        decisions.note(
            f"the launcher asked for mixed_precision={launcher}; the recipe decides precision, so it is ignored "
            "(set bf16 or fp16 in the recipe to change it)"
        )
    # transformers falls back on the launcher's setting when bf16 and fp16 are both false: pin it.
    os.environ["ACCELERATE_MIXED_PRECISION"] = chosen
    label = {"bf16": "bf16 mixed precision (fp32 master weights)", "fp16": "fp16 mixed precision", "no": "fp32"}
    decisions.note(f"precision: {label[chosen]} ({reason}); weights loaded as {values.get('dtype', 'float32')}")
    return {"bf16": chosen == "bf16", "fp16": chosen == "fp16"}


def apply_environment(environment: Any, decisions: Decisions) -> None:
    """Set the recipe's ``env:`` variables; one that a library already read at import time is an error, not a no-op."""
    if not isinstance(environment, dict):
        raise decisions.error("env must be a mapping of VARIABLE: value")
    for name, value in environment.items():
        name, value = str(name), str(value)
        library = IMPORT_TIME_ENV.get(name)
        if library in sys.modules and os.environ.get(name) != value:
            raise decisions.error(
                f"env: {name} is read by {library} when it is imported, which happened before this recipe was "
                f"loaded, so it would have no effect. Run through the sftkit command (it sets env: first), or set "
                f"{name} in the environment before starting."
            )
        os.environ[name] = value


def resolve(checked: CheckedRecipe) -> Recipe:
    """The Recipe a run trains with on this machine, under this launcher.

    ``record`` starts as a copy of the recipe's values and becomes the record of the run (sftkit_run.yaml). Each
    decision reads it through ``view``, which none can change, so it sees every earlier decision applied; what it
    returns is applied here, in this order, and what it decided on the user's behalf is noted in the one
    ``Decisions``.
    """
    decisions, record = Decisions(checked.path), dict(checked.values)
    view = MappingProxyType(record)
    apply_environment(checked.environment, decisions)
    if "resume_from_checkpoint" in record:
        output_dir = str(setting(view, "output_dir") or "trainer_output")
        record["resume_from_checkpoint"] = resolve_resume(record, output_dir, decisions)
        if record["resume_from_checkpoint"] is None:
            decisions.note(f"resume_from_checkpoint auto: no checkpoint in {output_dir}, so the run starts fresh")
    record |= resolve_device(view, decisions)
    record |= resolve_precision(view, decisions)
    speed = resolve_speed(view, decisions, gpu_memory())
    # The levers sftkit chose for this machine: those it set where the recipe did not (not those it replaced).
    chosen = sorted(lever for lever in LEVERS if lever in speed and lever not in record)
    record |= speed
    batch = batch_geometry(view, number_of_processes(), decisions)
    if batch.global_batch is not None:
        record["gradient_accumulation_steps"] = batch.accumulation
        decisions.note(batch.derivation())
    adjusted = reconcile_launcher(record, batch, decisions)
    if record.get("resume_from_checkpoint"):
        check_resume(record["resume_from_checkpoint"], record, batch, decisions)

    built = {}
    for cls in RECIPE_CLASSES:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        arguments = {key: value for key, value in {**record, **adjusted}.items() if key in names}
        if cls is DatasetMixtureConfig and checked.mixture_entries:
            arguments["datasets"] = checked.mixture_entries
        try:
            built[cls] = cls(**arguments)
        except (ValueError, TypeError) as error:
            raise SftkitError(f"recipe {decisions.recipe_path} with this launcher's settings: {error}") from None
    return Recipe(
        script=built[ScriptArguments],
        training=built[SFTConfig],
        model=built[ModelConfig],
        mixture=built[DatasetMixtureConfig],
        sftkit=built[SftkitArguments],
        values=record,
        path=decisions.recipe_path,
        notes=decisions.notes,
        batch=batch,
        entry_adapters=checked.entry_adapters,
        chosen_levers=chosen,
    )


def load_recipe(path: str | None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and check a recipe (``sftkit.recipe.read_recipe``), then resolve it for this machine and launcher."""
    return resolve(read_recipe(path, overrides))
