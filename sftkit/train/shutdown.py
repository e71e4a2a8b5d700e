"""Ending a run cleanly: SIGTERM or SIGUSR1 saves a checkpoint and stops, and every process leaves the process group
together.

Kubernetes and SLURM send SIGTERM before they kill a job (preemption, a time limit, ``kubectl delete``). SIGUSR1 is
the warning SLURM sends ahead of a time limit with ``--signal``: ``configs/slurm/train.sbatch`` has it passed to every
process of the job, its launchers started with SIGUSR1 ignored, so that only the training processes act on it (a
launcher passes SIGTERM on, then kills them after a grace of its own: 30 s for torchrun). Each process notes the
signal; after every step the processes agree, over a small gloo group of their own (no wait on the GPU), whether
any of them got one, so they all save the same step's checkpoint and stop together.

A process that leaves while another still holds the process group, or whose trainer (and its gloo or NCCL work
objects) is left for the interpreter's shutdown to free, can abort the whole job with SIGABRT after training
finished, leaving the other machines waiting at torchrun's exit barrier. ``leave_together`` ends every path
through a run (finished, stopped by the bad-row policy, stopped by a signal) the same way: a barrier, the process
group destroyed, and nothing distributed left for the interpreter to free.
"""

from __future__ import annotations

import gc
import signal
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from transformers import TrainerCallback

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: SLURM's --signal before a time limit


@dataclass(frozen=True)
class Stop:
    """Why training ended before max_steps: invalid rows under the bad-row policy, the loss guard, or a signal."""

    cause: Literal["invalid rows", "loss guard", "signal"]
    detail: str


class StopOnSignal(TrainerCallback):
    """Saves a checkpoint and stops training after the step during which any process received one of STOP_SIGNALS."""

    def __init__(self, several_processes: bool) -> None:
        self.received = 0  # the number of the signal this process received; 0: none
        self.stopped_at: int | None = None  # the step whose checkpoint was saved on the signal
        self.stopped_on: str | None = None  # the signal's name, the same on every process ("SIGTERM")
        self.group = dist.new_group(backend="gloo") if several_processes else None  # every process creates it
        self.previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signum

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.previous = {signum: signal.signal(signum, self._note) for signum in STOP_SIGNALS}
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        received = self.received
        if self.group is not None:
            flag = torch.tensor([received])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            received = int(flag.item())
        if received:
            self.stopped_at = state.global_step
            self.stopped_on = signal.Signals(received).name
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        return control


def leave_together() -> None:
    """Every process waits for the others, then destroys the process group; what held it is freed now, while the
    interpreter is whole."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    gc.collect()
