"""TRL's SFTTrainer, counting what it trains on, computing the loss without logits where that reproduces the model's
own head (``sftkit.train.head_loss``), and applying the bad-row policy (``sftkit.data.bad_rows``) to rows met mid-run.

Nothing here waits for the GPU between steps: token counts arrive with each batch as integers
(``sftkit.train.counting``), and the counters of several processes are summed only when they are logged.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import rotate_checkpoints
from trl import SFTTrainer

from sftkit.data.order import EpochOrder
from sftkit.errors import SftkitError
from sftkit.train.batches import BatchFacts, take_facts
from sftkit.train.checkpoints import (
    STAGING_DIR,
    publish,
    read_counts,
    space_to_write,
    write_checkpoint_record,
    write_counts,
)
from sftkit.train.head_loss import (
    KERNELS,
    LABEL_POSITIONS,
    LOGITS,
    add_head_loss,
    exact_path,
    inspect_head,
    kernel_features,
)
from sftkit.train.loss_guard import LossGuard
from sftkit.train.model_card import write_model_card
from sftkit.train.row_policy import MidRunRows, RowPolicy, summed
from sftkit.train.shutdown import Stop, StopOnSignal

logger = logging.getLogger(__name__)

# What computes the loss, for the log, by lm_head_loss path.
PATH_NAMES = {"trl": "TRL's fused head (lm_head_loss: trl; no logits either)",
              LOGITS: "the model's own logits (lm_head_loss: logits; exact for any head, but the logits are built)",
              **{kernel: f"the {kernel} kernel" for kernel in KERNELS}}


class LogLastStep(TrainerCallback):
    """The last step's loss is logged whatever logging_steps is: a run shorter than logging_steps still has a loss
    in its history, its summary and loss.png."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control


@dataclass
class RunRules:
    """What sftkit's trainer takes beside SFTTrainer's arguments: the training order (``sftkit.data.order``), the
    recipe recorded in every checkpoint, the bad-row policy and the rows already known invalid, the loss path asked
    (``head_loss``; ``head_loss_chosen``: by sftkit, not the recipe), the loss guard's limit and a mixture's held-out
    rows source by source."""

    order: EpochOrder
    recipe_values: dict[str, Any]
    on_invalid: str = "error"
    max_invalid_fraction: float = 0.0
    known_invalid: set[int] = field(default_factory=set)
    head_loss: str | None = "trl"
    head_loss_chosen: bool = False
    grad_norm_limit: float | None = None
    eval_by_source: dict[str, Any] = field(default_factory=dict)


class SftkitTrainer(SFTTrainer):
    """SFTTrainer that counts the training tokens fed and trained, and the rows drawn and found invalid.

    ``head_loss``: the path asked to compute the training loss: a kernel of ``sftkit.train.head_loss`` (from the
    hidden states), ``logits`` (the model's own), or ``trl`` (TRL's fused head, which also logs entropy and token
    accuracy); None where only TRL's own loss computes what the arguments ask (loss_type, label smoothing). The loaded
    model's head decides whether it reproduces the model's loss; if not, the exact path that does is taken, with a
    warning, or with a note where sftkit chose the path for this machine (``head_loss_chosen``).
    ``self.head_loss`` is the path taken, None for TRL's.
    """

    def __init__(self, *args: Any, rules: RunRules, **kwargs: Any) -> None:
        self.order = rules.order  # the training order, read by every epoch
        self.eval_by_source = rules.eval_by_source  # a mixture's held-out rows, source by source
        self.recipe_values = rules.recipe_values  # recorded in every checkpoint
        self.staging = False  # while a checkpoint is written: into the staging folder
        super().__init__(*args, **kwargs)
        self._choose_head_loss(rules.head_loss, rules.head_loss_chosen)
        self.tokens_fed = self.tokens_trained = 0
        self.step_rows: list[int] = []
        self.loss_guard = LossGuard(self.args.device, rules.grad_norm_limit, overflow_is_normal=self.args.fp16)
        self.watched_step = -1
        self.rows = MidRunRows(rules.known_invalid)
        self.stopped: Stop | None = None  # why training ended before max_steps, if it did
        self.signal = StopOnSignal(several_processes=self.accelerator.num_processes > 1)
        for callback in (RowPolicy(self, self.rows, rules.on_invalid, rules.max_invalid_fraction), LogLastStep(),
                         self.signal):
            self.add_callback(callback)

    def trial_step(self) -> None:
        """One batch through the data loader, forward and backward, that trains, counts, lists and watches nothing:
        what proves the speed levers on this machine before step 1 (``sftkit.train.levers``)."""
        batch = next(iter(self.get_train_dataloader()))
        self.model.train()
        try:
            self.compute_loss(self.model, batch).backward()
        finally:
            self.model.zero_grad(set_to_none=True)
            self.tokens_fed = self.tokens_trained = 0
            self.rows.forget()
            self.step_rows = []
            self.loss_guard.forget()

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """The held-out loss over all rows, then, for a mixture, over each source's rows (``eval_<source>_loss``):
        a mixture that helps one source and hurts another shows it."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if eval_dataset is None:
            for name, rows in self.eval_by_source.items():
                metrics.update(super().evaluate(rows, ignore_keys, f"{metric_key_prefix}_{name}"))
        return metrics

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        batch = take_facts(inputs)
        self.step_rows += batch.row_ids  # the rows of the optimizer step under way
        if not model.training:
            if self.head_loss == LOGITS and not return_outputs:  # TRL's fused head does not reproduce this model's
                return self._head_loss(model, inputs, batch, num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.tokens_fed += batch.tokens_fed
        self.tokens_trained += batch.tokens_trained
        drawn = batch.rows_drawn if batch.rows_drawn is not None else inputs["labels"].shape[0]
        self.rows.count(batch.invalid, drawn, self.state.global_step + 1)
        if self.head_loss is None or return_outputs:
            computed = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.loss_guard.watch_loss(computed[0] if return_outputs else computed, self.state.global_step + 1)
            return computed
        loss = self._head_loss(model, inputs, batch, num_items_in_batch)
        self.loss_guard.watch_loss(loss, self.state.global_step + 1)
        return loss

    def _choose_head_loss(self, asked: str | None, chosen: bool) -> None:
        """Inspect the loaded model's head (after PEFT) and take the path that reproduces its loss."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.head = inspect_head(model)
        add_head_loss(model, self.head)  # the path is chosen per call: a dropped lever switches it
        wanted = asked or "trl"
        path, self.head_loss_why = exact_path(wanted, self.head, kernel_features(wanted) if wanted in KERNELS else ())
        if asked is None and path != "trl":
            if self.args.loss_type != "nll":
                raise SftkitError(f"loss_type {self.args.loss_type} is computed by TRL's fused head, which does not "
                                  f"reproduce this model's head: {self.head_loss_why}. Use loss_type: nll.")
            path, self.head_loss_why = "trl", None  # label smoothing: TRL's loss comes from the model's own logits
        self.head_loss = None if path == "trl" else path
        if self.head_loss_why is not None:
            logger.log(logging.INFO if chosen else logging.WARNING, "speed: lm_head_loss %s does not reproduce this "
                       "model's head: %s; the loss is computed by %s", wanted, self.head_loss_why, PATH_NAMES[path])
        elif path in KERNELS and self.head.describe() != "hidden @ W.T":
            logger.info("speed: lm_head_loss %s computes this model's logits as %s", path, self.head.describe())

    def exact_fallback(self) -> str | None:
        """The exact path that replaces a kernel failing on this machine: None for TRL's head where it reproduces the
        model's head (``self.head.trl_differs`` says why not), else the model's own logits."""
        return None if self.head.trl_differs is None else LOGITS

    def _head_loss(self, model: torch.nn.Module, inputs: dict[str, Any], batch: BatchFacts,
                   num_items_in_batch: Any) -> torch.Tensor:
        positions = batch.label_positions.to(inputs["input_ids"].device)
        summed_loss = model(**inputs, sftkit_head_loss=self.head_loss, **{LABEL_POSITIONS: positions})
        # As TRL divides: by the tokens of the whole optimizer step (all processes, when averaged across them).
        tokens = num_items_in_batch if num_items_in_batch is not None else batch.tokens_trained
        loss = summed_loss / torch.as_tensor(tokens, device=summed_loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return loss

    def _maybe_log_save_evaluate(self, tr_loss: torch.Tensor, grad_norm: Any, *args: Any, **kwargs: Any) -> None:
        """Before the parent logs, evaluates or saves: the loss guard, read when a step is logged or saved."""
        if self.state.global_step != self.watched_step:  # called again at the end of an epoch for the same step
            self.loss_guard.watch_step(self.state.global_step, grad_norm, self.step_rows)
            self.watched_step, self.step_rows = self.state.global_step, []
        control = self.control
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            tripped = self.loss_guard.tripped(self.accelerator.num_processes)
            if tripped:  # nothing the bad step spoiled is saved or evaluated
                self.stopped = Stop("loss guard", tripped)
                control.should_save = control.should_evaluate = False
                control.should_training_stop = True
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _get_output_dir(self, trial: Any) -> str:
        if self.staging:
            return str(Path(self.args.output_dir) / STAGING_DIR)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """The parent's checkpoint, written whole into the staging folder and then moved into output_dir; older ones
        are deleted after that, by step (``sftkit.train.checkpoints``)."""
        output_dir, name = Path(self.args.output_dir), f"checkpoint-{self.state.global_step}"
        staged = output_dir / STAGING_DIR / name
        counts = self.totals()  # every process takes part
        if self.args.should_save and staged.exists():  # left by a run killed while saving
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotated below, once it is in place
        self.staging = True
        with space_to_write(staged, output_dir):
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.staging, self.args.save_total_limit = False, limit
            if self.args.should_save:
                if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint).parent == staged.parent:
                    self.state.best_model_checkpoint = str(output_dir / Path(self.state.best_model_checkpoint).name)
                    self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
                write_checkpoint_record(staged, self.recipe_values, self.accelerator.num_processes)
                write_counts(staged, counts)
        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            publish(staged, output_dir)
            rotate_checkpoints(str(output_dir), limit, self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None) -> None:
        """output_dir/README.md from the recipe (``sftkit.train.model_card``): the base model, the data, sftkit's
        version and the recipe, where TRL's card knows only what the loaded config says."""
        if self.is_world_process_zero():
            write_model_card(self.recipe_values, self.args.output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The parent's save; on a full disk, one error that names the file and the checkpoint to go on from."""
        with space_to_write(Path(output_dir or self.args.output_dir), Path(self.args.output_dir)):
            super().save_model(output_dir, _internal_call)

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> Any:
        """The parent's training; a resumed run's counts (tokens, rows) go on from its checkpoint's, held by the main
        process so that the sum over processes is the run's."""
        if resume_from_checkpoint is not None and self.accelerator.is_main_process:
            counts = read_counts(Path(resume_from_checkpoint))
            self.tokens_fed += counts.get("tokens_fed", 0)
            self.tokens_trained += counts.get("tokens_trained", 0)
            self.rows.drawn += counts.get("rows_drawn", 0)
            self.rows.invalid += counts.get("rows_invalid", 0)
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self.stopped is None and self.signal.stopped_at is not None:
            self.stopped = Stop("signal", f"{self.signal.stopped_on} after step {self.signal.stopped_at}")
        return result

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """A tied head is not stored in a checkpoint (its weight is the input embedding's): not a missing key."""
        names: dict[int, list[str]] = {}
        for name, parameter in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(parameter), []).append(name)
        tied = {name for group in names.values() if len(group) > 1 for name in group}
        super()._issue_warnings_after_load(load_result._replace(
            missing_keys=[key for key in load_result.missing_keys if key not in tied]))

    def _get_train_sampler(self, train_dataset: Any = None) -> EpochOrder:
        """The training order of ``sftkit.data.order``: the same rows next, however the run was prepared or resumed."""
        return self.order

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Tokens seen, counted by the collators, summed over the processes only here, when logged."""
        self._total_train_tokens = summed(self.accelerator, self.tokens_fed)[0]
        self._metrics["train" if self.model.training else "eval"]["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)

    def totals(self) -> dict[str, int]:
        """Counts summed over every process (every process must call it)."""
        counts = {"tokens_fed": self.tokens_fed, "tokens_trained": self.tokens_trained,
                  "rows_drawn": self.rows.drawn, "rows_invalid": self.rows.invalid}
        return dict(zip(counts, summed(self.accelerator, *counts.values()), strict=True))
