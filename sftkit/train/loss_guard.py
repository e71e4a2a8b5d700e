"""The loss guard: a NaN or infinite loss, or a gradient norm past ``grad_norm_limit``, stops the run and says where.

Nothing is read back from the device at each step: the first step that went wrong is kept on the device and read
when the trainer reads anyway (a logging step), and before every checkpoint, so no checkpoint holds weights the
bad step spoiled. The message names that step, what went wrong, the rows its batch trained on, and the last
good checkpoint.

TRL's own NaN filter (``logging_nan_inf_filter``) hides such a loss from the log and reads every loss back from
the device to do it; sftkit turns it off, as the guard takes its place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from accelerate.utils import gather_object

SHOWN_ROWS = 8
_NONE = torch.iinfo(torch.long).max  # no bad step, where the processes agree on the earliest


@dataclass
class Step:
    """What one process saw of one optimizer step, kept on the device until it is needed."""

    rows: list[int] = field(default_factory=list)
    bad_loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None


class LossGuard:
    """One process's watch over its losses and gradient norms; ``tripped`` is a collective."""

    def __init__(self, device: torch.device, grad_norm_limit: float | None, overflow_is_normal: bool) -> None:
        self.first_bad = torch.full((), _NONE, dtype=torch.long, device=device)
        self.grad_norm_limit = grad_norm_limit
        self.overflow_is_normal = overflow_is_normal  # fp16 loss scaling skips a step whose gradient overflowed
        self.steps: dict[int, Step] = {}  # since the last check

    def forget(self) -> None:
        """Back to nothing seen (after the batch that proves the speed levers, which is not training)."""
        self.first_bad.fill_(_NONE)
        self.steps.clear()

    def _mark(self, bad: torch.Tensor, step: int) -> None:
        self.first_bad = torch.where(bad & (self.first_bad == _NONE), step, self.first_bad)

    def watch_loss(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        seen = self.steps.setdefault(step, Step())
        seen.bad_loss = bad if seen.bad_loss is None else seen.bad_loss | bad
        self._mark(bad, step)

    def watch_step(self, step: int, grad_norm: torch.Tensor | float | None, rows: list[int]) -> None:
        seen = self.steps.setdefault(step, Step())
        seen.rows = rows
        if grad_norm is None:
            return
        norm = torch.as_tensor(grad_norm, device=self.first_bad.device, dtype=torch.float32)
        seen.grad_norm = norm
        bad = torch.zeros((), dtype=torch.bool, device=norm.device) if self.overflow_is_normal else ~torch.isfinite(norm)
        if self.grad_norm_limit is not None:
            bad = bad | (norm > self.grad_norm_limit)
        self._mark(bad, step)

    def tripped(self, num_processes: int) -> str | None:
        """What went wrong at the first bad step of any process (a collective when there are several), or None."""
        first = self.first_bad.clone()
        if num_processes > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = int(first)
        if step == _NONE:
            self.steps.clear()
            return None
        seen = self.steps.get(step, Step())
        reasons = []
        if seen.bad_loss is not None and bool(seen.bad_loss):
            reasons.append("the loss was NaN or infinite")
        if seen.grad_norm is not None:
            norm = float(seen.grad_norm)
            if not math.isfinite(norm):
                reasons.append("the gradient norm was NaN or infinite")
            elif self.grad_norm_limit is not None and norm > self.grad_norm_limit:
                reasons.append(f"the gradient norm was {norm:.4g}, past grad_norm_limit {self.grad_norm_limit:g}")
        parts = [(reasons, seen.rows)]
        if num_processes > 1:
            parts = gather_object(parts)
        said = sorted({reason for part_reasons, _ in parts for reason in part_reasons})
        rows = sorted({row for _, part_rows in parts for row in part_rows})
        shown = ", ".join(map(str, rows[:SHOWN_ROWS])) + (
            f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else "")
        return f"{' and '.join(said) or 'a step went wrong'} at step {step}; its batch trained rows {shown or 'none'}"
