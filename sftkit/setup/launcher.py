"""The launcher's config against the recipe: conflicts are explained before training, never met deep in DeepSpeed.

``accelerate launch`` passes its config to the job as ``ACCELERATE_*`` environment variables; a
DeepSpeed JSON can also come from the recipe's ``deepspeed`` key. The recipe decides the batch
geometry and precision, so a launcher value that fixes them differently is an error here, and a
ZeRO-3 run is made to save a consolidated, loadable model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from sftkit.errors import SftkitError
from sftkit.recipe import BatchGeometry, Decisions

DEEPSPEED_FILE_ENV = "ACCELERATE_DEEPSPEED_CONFIG_FILE"
ZERO3_SAVE_ENV = "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"


def _is_fixed(value: Any) -> bool:
    return value is not None and value != "auto"


def _read_deepspeed(config: str | dict, where: str) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise SftkitError(f"{where}: DeepSpeed config {config} does not exist (paths are relative to where you launch)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SftkitError(f"{where}: DeepSpeed config {config} is not valid JSON: {error}") from None


def _check_geometry(config: dict[str, Any], values: dict[str, Any], batch: BatchGeometry, where: str) -> None:
    expected = {
        "train_micro_batch_size_per_gpu": batch.per_device,
        "gradient_accumulation_steps": batch.accumulation,
        "train_batch_size": batch.rows_per_step,
    }
    for key, wanted in expected.items():
        if _is_fixed(config.get(key)) and config[key] != wanted:
            raise SftkitError(
                f"{where} fixes {key}: {config[key]}, but the recipe means {wanted} "
                f"(per_device_train_batch_size {batch.per_device} x gradient_accumulation_steps "
                f"{batch.accumulation} x {batch.processes} process(es)). DeepSpeed would stop every rank over this. "
                f"Set {key}: \"auto\" in the DeepSpeed config so that it follows the recipe."
            )
    for precision in ("bf16", "fp16"):
        enabled = config.get(precision, {}).get("enabled")
        if _is_fixed(enabled) and bool(enabled) != bool(values.get(precision)):
            raise SftkitError(
                f"{where} sets {precision}.enabled: {str(enabled).lower()}, but the recipe trains with "
                f"bf16: {str(values.get('bf16')).lower()}, fp16: {str(values.get('fp16')).lower()}. Set "
                f"{precision}.enabled: \"auto\" and let the recipe decide precision."
            )


def _gather_on_save(config: dict[str, Any], decisions: Decisions) -> dict[str, Any] | None:
    """For ZeRO-3, a copy of the config that consolidates weights on save; None when nothing must change."""
    zero = config.get("zero_optimization", {})
    if zero.get("stage") != 3 or zero.get("stage3_gather_16bit_weights_on_model_save") is True:
        return None
    decisions.note("ZeRO-3: stage3_gather_16bit_weights_on_model_save set to true so that the saved model loads")
    return {**config, "zero_optimization": {**zero, "stage3_gather_16bit_weights_on_model_save": True}}


def _write_temporary(config: dict[str, Any]) -> str:
    handle, path = tempfile.mkstemp(prefix="sftkit-deepspeed-", suffix=".json")
    with os.fdopen(handle, "w") as file:
        json.dump(config, file, indent=2)
    return path


def reconcile_launcher(values: dict[str, Any], batch: BatchGeometry, decisions: Decisions) -> dict[str, Any]:
    """Check the launcher's and the recipe's DeepSpeed settings against the recipe; adjust only what saving needs.

    Returns keys to build the training arguments with (the recipe's values stay as written, for the record).
    """
    launcher_accumulation = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if (os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and launcher_accumulation not in (None, "auto")
            and int(launcher_accumulation) != batch.accumulation):
        raise SftkitError(
            f"the accelerate config sets gradient_accumulation_steps: {launcher_accumulation} in its DeepSpeed "
            f"section, but the recipe {decisions.recipe_path} means {batch.accumulation}. DeepSpeed would stop every "
            "rank over this. Remove gradient_accumulation_steps from the accelerate config (or set the same value), "
            "and let global_batch_size or gradient_accumulation_steps in the recipe decide."
        )
    if values.get("deepspeed"):
        config = _read_deepspeed(values["deepspeed"], f"recipe {decisions.recipe_path}: deepspeed")
        where = f"the DeepSpeed config {values['deepspeed']} of recipe {decisions.recipe_path}"
        _check_geometry(config, values, batch, where)
        if (patched := _gather_on_save(config, decisions)) is not None:
            return {"deepspeed": patched}
    elif os.environ.get(DEEPSPEED_FILE_ENV) not in (None, "", "none"):
        launcher_file = os.environ[DEEPSPEED_FILE_ENV]
        config = _read_deepspeed(launcher_file, "the accelerate config")
        where = f"the DeepSpeed config {launcher_file} of the accelerate config"
        _check_geometry(config, values, batch, where)
        if (patched := _gather_on_save(config, decisions)) is not None:
            os.environ[DEEPSPEED_FILE_ENV] = _write_temporary(patched)
    elif os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" and os.environ.get(ZERO3_SAVE_ENV) != "true":
        decisions.note("ZeRO-3: zero3_save_16bit_model set to true so that the saved model loads")
        os.environ[ZERO3_SAVE_ENV] = "true"
    return {}


def partial_batch_note(rows: int, batch: BatchGeometry, max_steps: int, drop_last: bool) -> str | None:
    """What happens to an epoch's last, partial batch across processes, when the run reaches one."""
    remainder = rows % batch.rows_per_pass
    if batch.processes == 1 or remainder == 0 or drop_last:
        return None
    if max_steps > 0 and max_steps * batch.rows_per_step <= rows:
        return None  # the run ends before the first epoch does
    return (
        f"{rows:,} train rows do not fill whole batches of {batch.per_device} x {batch.processes} processes: each "
        f"epoch's last batch repeats {batch.rows_per_pass - remainder} rows from the start of the epoch so that every "
        "process gets one (accelerate's even_batches). Set dataloader_drop_last: true to drop the partial batch "
        "instead."
    )
