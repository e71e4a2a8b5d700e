"""The same command run again on a run that got to its end: nothing trains twice, and what is left undone is done.

With ``resume_from_checkpoint: auto`` the command that trained a run can simply be run again, after a crash or
not. If its latest checkpoint is at the end of the run the recipe describes (its last step), the run has trained
all it will: a finished run (its final model saved and its result recorded) is left exactly as it is, and a run
killed or stopped by a full disk during its final save completes that save from the checkpoint, and trains
nothing. A recipe that asks for more steps (or epochs) than the checkpoint's run trained resumes and trains them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from sftkit.train.run_record import RECORD_NAME, add_to_run_record

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
# What a checkpoint holds beyond the model that the final save writes: the optimizer, scheduler and random states,
# DeepSpeed's shards, sftkit's own records.
TRAINING_STATE = ("optimizer", "scheduler", "rng_state", "sftkit_", "global_step", "zero_to_fp32", "latest")


def trained_steps(checkpoint: Path) -> tuple[int, int]:
    """(the checkpoint's step, the last step of the run that wrote it), from its trainer state."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    return state["global_step"], state["max_steps"]


def at_end(checkpoint: Path, args: Any) -> bool:
    """Whether ``checkpoint`` is the last step of the run the training arguments describe: its run's last step,
    and no more steps (``max_steps``) or epochs (``num_train_epochs``) asked for now."""
    step, last = trained_steps(checkpoint)
    if args.max_steps > 0:
        return step >= args.max_steps
    epochs = json.loads((checkpoint / STATE_FILE).read_text()).get("num_train_epochs", args.num_train_epochs)
    return step >= last and args.num_train_epochs <= epochs


def finished(output_dir: Path) -> bool:
    """Whether the run in ``output_dir`` ended: its final model saved and its result recorded (the last write)."""
    record = output_dir / RECORD_NAME
    return record.is_file() and "result" in (yaml.safe_load(record.read_text()) or {})


def complete_final_save(checkpoint: Path, output_dir: Path) -> list[str]:
    """Write the final model of a run that ended at ``checkpoint`` into ``output_dir``, as its final save does: the
    checkpoint's model files and trainer state, each written under a temporary name and then renamed. Returns the
    files written."""
    written = []
    for source in sorted(checkpoint.iterdir()):
        if not source.is_file() or source.name.startswith(TRAINING_STATE):
            continue
        partial = output_dir / f".{source.name}.partial"
        shutil.copyfile(source, partial)
        os.replace(partial, output_dir / source.name)
        written.append(source.name)
    step, _ = trained_steps(checkpoint)
    add_to_run_record(str(output_dir), "result", {"steps": step, "final save completed from": checkpoint.name})
    return written


def rerun_of_an_ended_run(checkpoint: Path, output_dir: Path, is_main_process: bool) -> None:
    """Leave a finished run as it is, or complete the final save of one that ended at ``checkpoint``; log which."""
    step, _ = trained_steps(checkpoint)
    if finished(output_dir):
        logger.info("output_dir %s holds a finished run (step %d of %d, its model saved): nothing to train. Raise "
                    "max_steps (or num_train_epochs) to train on from %s, or set overwrite_output_dir: true to "
                    "start over", output_dir, step, step, checkpoint.name)
        return
    logger.info("the run in %s trained to its last step, %d, but its final save did not complete: completing it "
                "from %s, training nothing", output_dir, step, checkpoint.name)
    if is_main_process:
        written = complete_final_save(checkpoint, output_dir)
        logger.info("final save completed: %s written to %s", ", ".join(written), output_dir)
