"""Preflight: what would doom a run, found before any weights load (``sftkit check`` runs the same checks).

The model must be reachable, ``max_length`` within its positions, and ``output_dir`` writable, with room for a
checkpoint, and not holding another run's work: a finished run, or the checkpoints of one that stopped, are
refused unless the recipe resumes (``resume_from_checkpoint``) or starts over (``overwrite_output_dir``).
Reading nothing but configs, it writes nothing either.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from sftkit import embedded
from sftkit.errors import SftkitError
from sftkit.recipe import Recipe
from sftkit.train.checkpoints import STAGING_DIR, checkpoints
from sftkit.train.model import parameter_count
from sftkit.train.run_record import RECORD_NAME

logger = logging.getLogger(__name__)

FINISHED_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
CHECKPOINT_BYTES_PER_PARAMETER = 12  # fp32 weights and AdamW's two fp32 moments, as the trainer writes them


def preflight(recipe: Recipe) -> None:
    """Raise SftkitError, saying what to do, for a run that cannot succeed; log what deserves a warning."""
    check_hub(recipe.training)
    check_output_dir(recipe, check_model(recipe))


def check_hub(args: Any) -> None:
    """push_to_hub: a token and a Hub that accepts it, found before any data is read, not after training."""
    if not args.push_to_hub:
        return
    from huggingface_hub import constants, get_token, whoami

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise SftkitError("push_to_hub: true, but HF_HUB_OFFLINE is set, so the model could not be pushed: unset it, "
                          "or remove push_to_hub and upload output_dir later (hf upload REPO output_dir)")
    token = args.hub_token or get_token()
    if token is None:
        raise SftkitError("push_to_hub: true needs a Hugging Face token with write access: run `hf auth login`, or "
                          "set HF_TOKEN in the environment (or in the recipe's env:); or remove push_to_hub")
    try:
        whoami(token=token)
    except Exception as error:  # noqa: BLE001 - no network, a refused token: either way nothing could be pushed
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SftkitError(f"push_to_hub: the Hugging Face Hub cannot be reached with this token ({reason}); check "
                          "the network and the token, or remove push_to_hub and upload output_dir later") from None


def check_model(recipe: Recipe) -> Any:
    """The model's config, once it is known to be reachable and to hold ``max_length`` tokens."""
    if recipe.training.trust_remote_code:
        logger.warning("trust_remote_code: true runs Python code from %s on this machine; keep it only for "
                       "repositories you trust", recipe.model.model_name_or_path)
    config = model_config(recipe)
    check_max_length(recipe, config)
    return config


def model_config(recipe: Recipe) -> Any:
    """The model's config, read without its weights; unreachable, it says how to point at a local copy."""
    from transformers import AutoConfig

    name = recipe.model.model_name_or_path
    try:
        return AutoConfig.from_pretrained(embedded.resolve(name), revision=recipe.model.model_revision,
                                          trust_remote_code=recipe.training.trust_remote_code)
    except Exception as error:  # noqa: BLE001 - whatever stops the config from loading, the user needs it named
        reason = str(error).strip().splitlines()[0]
        raise SftkitError(
            f"model_name_or_path {name}: cannot be read ({reason}). If it is a Hub id and this machine has no "
            f"network, download it where there is one (huggingface-cli download {name} --local-dir DIR), copy DIR "
            "here and set model_name_or_path: DIR; or, if it is in the Hub cache, set HF_HUB_OFFLINE=1."
        ) from None


def check_max_length(recipe: Recipe, config: Any) -> None:
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    length = recipe.training.max_length
    if positions is not None and length is not None and length > positions:
        raise SftkitError(f"max_length {length} is beyond the {positions} positions of "
                          f"{recipe.model.model_name_or_path}: set max_length to {positions} or less")


def _finished(output_dir: Path) -> bool:
    if any((output_dir / name).is_file() for name in FINISHED_MODEL_FILES):
        return True
    record = output_dir / RECORD_NAME
    return record.is_file() and "\nresult:" in record.read_text()


def check_output_dir(recipe: Recipe, config: Any) -> None:
    """output_dir: another run's work is not overwritten unasked, and a checkpoint can be written."""
    output_dir = Path(recipe.training.output_dir)
    resuming, overwriting = recipe.training.resume_from_checkpoint is not None, recipe.sftkit.overwrite_output_dir
    if output_dir.is_dir() and not resuming and not overwriting:
        found = checkpoints(output_dir)
        if _finished(output_dir):
            resume = ", or resume_from_checkpoint: auto to go on from its last checkpoint" if found else ""
            raise SftkitError(f"output_dir {output_dir} holds a finished run: choose another output_dir, or set "
                              f"overwrite_output_dir: true to replace it{resume}")
        if found:
            raise SftkitError(f"output_dir {output_dir} holds {found[-1].name} of a run that did not finish: set "
                              "resume_from_checkpoint: auto to go on from it, or overwrite_output_dir: true to start "
                              "over")
    existing = next(folder for folder in (output_dir, *output_dir.parents) if folder.exists())
    if not os.access(existing, os.W_OK):
        raise SftkitError(f"output_dir {output_dir}: {existing} is not writable; choose an output_dir you can write")
    if recipe.model.use_peft:  # a checkpoint holds the adapter only
        return

    needed = parameter_count(config) * CHECKPOINT_BYTES_PER_PARAMETER
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise SftkitError(f"output_dir {output_dir}: a checkpoint of {recipe.model.model_name_or_path} takes about "
                          f"{needed / 2**30:.1f} GiB and its disk has {free / 2**30:.1f} GiB free; free some space or "
                          "choose an output_dir on a larger disk")


def clear_for_overwrite(output_dir: str) -> None:
    """overwrite_output_dir: the old run's checkpoints go, so that a later resume cannot pick one of them up."""
    for checkpoint in checkpoints(output_dir):
        shutil.rmtree(checkpoint)
    shutil.rmtree(Path(output_dir) / STAGING_DIR, ignore_errors=True)
