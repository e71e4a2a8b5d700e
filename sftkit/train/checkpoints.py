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

import contextlib
import errno
import json
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from sftkit.errors import SftkitError
from sftkit.recipe import BatchGeometry, Decisions
from sftkit.redaction import redacted

STAGING_DIR = ".sftkit-staging"
CHECKPOINT_RECORD = "sftkit_checkpoint.yaml"
COUNTS_FILE = "sftkit_counts.json"  # tokens fed and trained, rows drawn and invalid, all processes summed
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# Keys a resumed run may change: where and how often it writes, how it is watched, and how fast it computes (the
# speed levers compute the same thing). max_steps and num_train_epochs may grow a run (a decaying learning rate
# then stretches to the new end from the checkpoint on). Every other key changes what is optimised.
MAY_CHANGE = {
    "output_dir", "resume_from_checkpoint", "max_steps", "num_train_epochs", "run_name", "report_to", "hub_token",
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


def write_checkpoint_record(checkpoint: Path, values: dict[str, Any], processes: int) -> None:
    """The resolved recipe of the run that wrote ``checkpoint``, its secrets redacted, for ``differences``."""
    rows_per_step = BatchGeometry.recorded(values, processes).rows_per_step
    record = {"recipe": redacted(values), "processes": processes, "rows_per_step": rows_per_step}
    (checkpoint / CHECKPOINT_RECORD).write_text(yaml.safe_dump(record, sort_keys=False, allow_unicode=True))


def differences(checkpoint: Path, values: dict[str, Any], batch: BatchGeometry) -> list[str]:
    """What the recipe now changes in what the checkpoint's run optimised: ``key: then -> now`` lines. The batch is
    compared as rows per optimizer step (``batch``: the resuming run's), however processes and accumulation split
    it."""
    path = checkpoint / CHECKPOINT_RECORD
    if not path.is_file():  # a checkpoint sftkit did not write: nothing to compare against
        return []
    record = yaml.safe_load(path.read_text())
    then, values = record["recipe"], redacted(values)  # as recorded, so a rotated token is no change
    changed = [f"{key}: {then.get(key)!r} -> {values.get(key)!r}" for key in sorted(set(then) | set(values))
               if key not in MAY_CHANGE and key != "optim" and then.get(key) != values.get(key)]
    optimisers = (then.get("optim"), values.get("optim"))
    if optimisers[0] != optimisers[1] and not set(optimisers) <= SAME_OPTIMISER:
        changed.append(f"optim: {optimisers[0]!r} -> {optimisers[1]!r}")
    if record["rows_per_step"] != batch.rows_per_step:
        changed.append(f"rows per optimizer step: {record['rows_per_step']} -> {batch.rows_per_step} "
                       "(per_device_train_batch_size x gradient_accumulation_steps x processes; global_batch_size "
                       "keeps it on any number of processes)")
    return changed


# A torch file (optimizer, scheduler, random states, training arguments) is a zip archive; each of its members is
# checked against its CRC when the file is smaller than this (a larger one, by its archive's directory alone).
FULLY_CHECKED_BYTES = 256 << 20


def _damage(path: Path) -> str | None:
    """What is wrong with one file of a checkpoint (cut short, edited, not what its name says); None if nothing."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as archive:
                if path.stat().st_size <= FULLY_CHECKED_BYTES and (member := archive.testzip()) is not None:
                    return f"its member {member} does not match its checksum"
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as weights:
                weights.keys()
    except Exception as error:  # noqa: BLE001 - any reader's complaint means the file cannot be trusted
        return (str(error).strip().splitlines() or [type(error).__name__])[0]
    return None


def damage(checkpoint: Path) -> str | None:
    """What makes ``checkpoint`` unusable to resume from, file by file; None when every file reads as it should."""
    for path in sorted(checkpoint.iterdir()):
        if path.is_file() and (problem := _damage(path)) is not None:
            return f"{path.name}: {problem}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json: not a trainer state (no global_step)"
    return None


def check_intact(checkpoint: Path, decisions: Decisions) -> None:
    """Refuse a damaged checkpoint before anything loads, naming the file and the previous one that is whole."""
    problem = damage(checkpoint)
    if problem is None:
        return
    named = _CHECKPOINT.match(checkpoint.name)
    earlier = [path for path in checkpoints(checkpoint.parent)
               if named and int(_CHECKPOINT.match(path.name)[1]) < int(named[1])]
    whole = next((path for path in reversed(earlier) if damage(path) is None), None)
    instead = (f"resume from {whole}, the latest whole checkpoint before it (resume_from_checkpoint: {whole}), or "
               f"remove {checkpoint} so that auto finds it" if whole else
               f"no earlier checkpoint is whole: remove {checkpoint} and start over")
    raise decisions.error(f"checkpoint {checkpoint} is damaged ({problem}); {instead}")


def resolve_resume(values: dict[str, Any], output_dir: str, decisions: Decisions) -> str | None:
    """``resume_from_checkpoint``: ``auto`` is the latest complete checkpoint in output_dir, or a fresh start when
    there is none; ``true`` is the latest one, which must exist; a path must be a checkpoint."""
    asked = values.get("resume_from_checkpoint")
    if asked in (False, None, "false", "False"):
        return None
    if asked in (True, "true", "True", "auto"):
        latest = latest_checkpoint(output_dir)
        if latest is None and asked != "auto":
            raise decisions.error(f"resume_from_checkpoint: true, but output_dir {output_dir} holds no checkpoint-N "
                                  "folder to resume from; use auto to start fresh when there is none")
        if latest is not None:
            check_intact(latest, decisions)
        return str(latest) if latest is not None else None
    if not isinstance(asked, str) or not (Path(asked) / "trainer_state.json").is_file():
        raise decisions.error(f"resume_from_checkpoint {asked!r} is not a checkpoint (a checkpoint-N folder with a "
                              "trainer_state.json); use auto for the latest one in output_dir")
    check_intact(Path(asked), decisions)
    return asked


def check_resume(checkpoint: str, values: dict[str, Any], batch: BatchGeometry, decisions: Decisions) -> None:
    """Refuse to resume a checkpoint under a recipe that optimises something else, listing what differs."""
    changed = differences(Path(checkpoint), values, batch)
    if changed:
        listed = "\n  ".join(changed)
        raise decisions.error(
            f"resume_from_checkpoint {checkpoint} was written by a run that optimised something "
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


NEARLY_FULL_BYTES = 64 << 20  # a write that fails with less free than this failed for want of space


def out_of_space(error: BaseException, folder: Path) -> bool:
    """Whether a failed write failed because the disk is full: said outright (ENOSPC), or torch's stream writer's
    "unexpected pos" on a disk with next to nothing left."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error)
    if "No space left on device" in text or "os error 28" in text:
        return True
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    return ("unexpected pos" in text or "PytorchStreamWriter" in text) and \
        shutil.disk_usage(existing).free < NEARLY_FULL_BYTES


@contextlib.contextmanager
def space_to_write(path: Path, output_dir: Path) -> Iterator[None]:
    """Turn a write that fails on a full disk into one clear error naming what was written and the checkpoint to go on
    from; the half-written ``path`` is removed, giving its space back."""
    try:
        yield
    except Exception as error:
        if not out_of_space(error, path):
            raise
        if path.is_dir() and path.parent.name == STAGING_DIR:
            shutil.rmtree(path, ignore_errors=True)
        last = latest_checkpoint(output_dir)
        go_on = (f"run the same command with resume_from_checkpoint: auto to go on from {last.name}" if last else
                 "run the command again")
        raise SftkitError(f"no space left on device writing {path}: free some space (save_total_limit keeps fewer "
                          f"checkpoints), or choose an output_dir on a larger disk; then {go_on}") from None
