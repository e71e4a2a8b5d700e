"""Checkpoints a run can trust: written whole or not at all, found again for a resume, and checked against the
recipe that resumes from them.

A checkpoint is written under ``output_dir/.sftkit-staging`` and renamed to ``checkpoint-N`` once every process
has written its part, so a run killed while saving leaves no half-written ``checkpoint-N`` to be picked. Older
checkpoints are deleted (``save_total_limit``) only after the new one is in place, by step number: the last
good checkpoint is never the one deleted. Each checkpoint carries the resolved recipe of the run that wrote it
(``sftkit_checkpoint.yaml``); a resume under a recipe that trains something else is refused with the
differences listed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml
from trl import SFTConfig

from sftkit.errors import SftkitError
from sftkit.redaction import redact

STAGING_DIR = ".sftkit-staging"
CHECKPOINT_RECORD = "sftkit_checkpoint.yaml"
COUNTS_FILE = "sftkit_counts.json"  # tokens fed and trained, rows drawn and invalid, all processes summed
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# Keys a resumed run may change: where and how often it writes, how it is watched, and how fast it computes (the
# speed levers compute the same thing). max_steps and num_train_epochs may grow a run (a decaying learning rate
# then stretches to the new end from the checkpoint on). Every other key changes what is optimised.
MAY_CHANGE = {
    "output_dir", "resume_from_checkpoint", "max_steps", "num_train_epochs", "run_name", "report_to",
    "logging_steps", "logging_strategy", "logging_first_step", "logging_dir", "disable_tqdm", "log_level",
    "save_steps", "save_strategy", "save_total_limit", "save_only_model",
    "eval_strategy", "eval_steps", "eval_on_start", "do_eval", "per_device_eval_batch_size", "eval_samples",
    "prepare", "on_invalid", "max_invalid_fraction", "render_check_rows", "overwrite_output_dir",
    "dataloader_num_workers", "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_pin_memory",
    "attn_implementation", "lm_head_loss", "torch_compile", "fixed_batch_shape", "gradient_checkpointing",
    "use_liger_kernel", "grad_norm_limit",
    # the batch a step trains is compared as rows per step below, however processes and accumulation split it
    "per_device_train_batch_size", "gradient_accumulation_steps", "global_batch_size",
}
SAME_OPTIMISER = {"adamw_torch", "adamw_torch_fused"}  # one algorithm, one kernel or several


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints in ``output_dir`` (a ``checkpoint-N`` folder with its trainer state), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(match[1]), path) for path in folder.iterdir()
             if (match := _CHECKPOINT.match(path.name)) and (path / "trainer_state.json").is_file()]
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def rows_per_step(values: dict[str, Any], processes: int) -> int:
    """Rows (or packed sequences) one optimizer step trains, all processes together."""
    if values.get("global_batch_size") is not None:
        return values["global_batch_size"]
    return (values.get("per_device_train_batch_size", SFTConfig.per_device_train_batch_size)
            * values.get("gradient_accumulation_steps", SFTConfig.gradient_accumulation_steps) * processes)


def write_checkpoint_record(checkpoint: Path, values: dict[str, Any], processes: int) -> None:
    record = {"recipe": values, "processes": processes, "rows_per_step": rows_per_step(values, processes)}
    (checkpoint / CHECKPOINT_RECORD).write_text(redact(yaml.safe_dump(record, sort_keys=False, allow_unicode=True)))


def differences(checkpoint: Path, values: dict[str, Any], processes: int) -> list[str]:
    """What the recipe now changes in what the checkpoint's run optimised: ``key: then -> now`` lines."""
    path = checkpoint / CHECKPOINT_RECORD
    if not path.is_file():  # a checkpoint sftkit did not write: nothing to compare against
        return []
    record = yaml.safe_load(path.read_text())
    then = record["recipe"]
    changed = [f"{key}: {then.get(key)!r} -> {values.get(key)!r}" for key in sorted(set(then) | set(values))
               if key not in MAY_CHANGE and key != "optim" and then.get(key) != values.get(key)]
    optimisers = (then.get("optim"), values.get("optim"))
    if optimisers[0] != optimisers[1] and not set(optimisers) <= SAME_OPTIMISER:
        changed.append(f"optim: {optimisers[0]!r} -> {optimisers[1]!r}")
    if record["rows_per_step"] != rows_per_step(values, processes):
        changed.append(f"rows per optimizer step: {record['rows_per_step']} -> {rows_per_step(values, processes)} "
                       "(per_device_train_batch_size x gradient_accumulation_steps x processes; global_batch_size "
                       "keeps it on any number of processes)")
    return changed


def resolve_resume(values: dict[str, Any], recipe_path: str, output_dir: str) -> str | None:
    """``resume_from_checkpoint``: ``auto`` is the latest complete checkpoint in output_dir, or a fresh start when
    there is none; ``true`` is the latest one, which must exist; a path must be a checkpoint."""
    asked = values.get("resume_from_checkpoint")
    if asked in (False, None, "false", "False"):
        return None
    if asked in (True, "true", "True", "auto"):
        latest = latest_checkpoint(output_dir)
        if latest is None and asked != "auto":
            raise SftkitError(f"recipe {recipe_path}: resume_from_checkpoint: true, but output_dir {output_dir} holds no "
                              "checkpoint-N folder to resume from; use auto to start fresh when there is none")
        return str(latest) if latest is not None else None
    if not isinstance(asked, str) or not (Path(asked) / "trainer_state.json").is_file():
        raise SftkitError(f"recipe {recipe_path}: resume_from_checkpoint {asked!r} is not a checkpoint (a checkpoint-N "
                          f"folder with a trainer_state.json); use auto for the latest one in output_dir")
    return asked


def check_resume(checkpoint: str, values: dict[str, Any], processes: int, recipe_path: str) -> None:
    """Refuse to resume a checkpoint under a recipe that optimises something else, listing what differs."""
    changed = differences(Path(checkpoint), values, processes)
    if changed:
        listed = "\n  ".join(changed)
        raise SftkitError(
            f"recipe {recipe_path}: resume_from_checkpoint {checkpoint} was written by a run that optimised something "
            f"else; the recipe now changes:\n  {listed}\nResume with the checkpoint's values (its "
            f"{CHECKPOINT_RECORD} has them), or start a fresh run in another output_dir."
        )


def publish(staged: Path, output_dir: Path) -> Path:
    """Move a fully written checkpoint from the staging folder into output_dir, replacing one of the same step."""
    final = output_dir / staged.name
    if final.exists():  # the same step saved again (a stop requested on a save step)
        shutil.rmtree(final)
    staged.rename(final)
    if not any(staged.parent.iterdir()):
        staged.parent.rmdir()
    return final


def write_counts(checkpoint: Path, counts: dict[str, int]) -> None:
    """What the run had counted at this checkpoint, so that a resumed run's counts go on from it."""
    (checkpoint / COUNTS_FILE).write_text(json.dumps(counts))


def read_counts(checkpoint: Path) -> dict[str, int]:
    """The counts a checkpoint holds; none for one written before sftkit kept them."""
    path = checkpoint / COUNTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
