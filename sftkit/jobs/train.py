"""The training job, top to bottom: recipe -> data (load, adapt, validate, tokenize/pack) -> record -> SFTTrainer ->
model, summary and record. ``train`` reads as the list of steps; each step is a function below it."""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from accelerate import PartialState
from transformers import PreTrainedTokenizerBase, TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import IntervalStrategy
from trl import SFTConfig, get_peft_config, get_quantization_config, pack_dataset

from sftkit.data.account import metric_names
from sftkit.data.bad_rows import SKIPPED_ROWS_FILE
from sftkit.data.order import EpochOrder, in_training_order, order_seed, pack_in_order
from sftkit.data.preparation import prepare_data
from sftkit.data.prepared import PreparedData, valid_rows
from sftkit.errors import SftkitError, StoppedBySignal
from sftkit.outputs.callbacks import output_callbacks
from sftkit.outputs.progress import trainjob_progress
from sftkit.outputs.summary import summarise
from sftkit.outputs.trackers import check_trackers
from sftkit.recipe import Recipe
from sftkit.redaction import remember
from sftkit.setup.launcher import partial_batch_note
from sftkit.setup.preflight import clear_for_overwrite, preflight
from sftkit.setup.rerun import at_end, rerun_of_an_ended_run, trained_steps
from sftkit.train.attention import VARLEN, use_flex_attention_in_autocast_dtype, use_varlen_attention
from sftkit.train.checkpoints import latest_checkpoint
from sftkit.train.compilation import FixedShapeCollator, compile_decoder_layers
from sftkit.train.counting import CountingCollator
from sftkit.train.head_loss import KERNELS
from sftkit.train.levers import prove_levers
from sftkit.train.model import model_init_kwargs, model_path, settle_tokenizer, stop_on_end_of_turn
from sftkit.train.row_policy import SkippingCollator
from sftkit.train.run_record import RECORD_NAME, add_to_run_record, write_run_record
from sftkit.train.shutdown import Stop, leave_together
from sftkit.train.trainer import RunRules, SftkitTrainer

logger = logging.getLogger(__name__)


def train(recipe: Recipe, callbacks: Sequence[TrainerCallback] = (), save: bool = True) -> None:
    """Run one supervised fine-tuning job as the recipe describes it.

    ``callbacks`` observe it (benchmarks do); ``save=False`` leaves the trained model unwritten (benchmarks,
    whose 0.5B-parameter models would take seconds to write for nothing).
    """
    state = PartialState(cpu=recipe.training.use_cpu)
    start(recipe)
    if ended_already(recipe, state):  # the same command again after the run's last step: nothing trains twice
        return
    loss_path = head_loss(recipe)  # an adapter on lm_head fails here, before any data is read
    if state.is_main_process and recipe.sftkit.overwrite_output_dir and recipe.training.resume_from_checkpoint is None:
        clear_for_overwrite(recipe.training.output_dir)

    # Data. Processes wait for each other on the cache's file lock, never on a collective with a timeout. The
    # tokenizer is settled (chat template, special tokens) first, and the trainer gets a copy of it.
    tokenizer, added_tokens = settle_tokenizer(recipe)
    data = prepare(recipe, tokenizer, state)
    rows = trainer_rows(data, recipe.training)
    note = partial_batch_note(len(rows.train), recipe.batch, recipe.training.max_steps,
                              recipe.training.dataloader_drop_last)
    if note:
        logger.warning(note)
    args = trainer_arguments(recipe, data)
    if state.is_main_process:  # written before the first step, so even a crashed run says what it was
        record = write_run_record(args.output_dir, recipe.values, {"processes": recipe.batch.processes,
                                                                   **data.describe()})
        logger.info("run record: %s", record)

    # The trainer, its levers proved on one batch, then training.
    trainer = build_trainer(recipe, args, data, rows, tokenizer, added_tokens, loss_path, callbacks)
    dropped = prove_levers(trainer, recipe)  # a chosen lever that fails here gives way to the plain path
    if state.is_main_process:
        if dropped:
            add_to_run_record(args.output_dir, "levers_dropped", {lever: recipe.values[lever] for lever in dropped})
        why = {"why": trainer.head_loss_why} if trainer.head_loss_why else {}  # once the model's head was inspected
        add_to_run_record(args.output_dir, "lm_head_loss_used", {"path": trainer.head_loss or "trl", **why})
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if trainer.stopped is not None:
        stopped, checkpoint = trainer.stopped, latest_checkpoint(args.output_dir)
        del trainer
        leave_together()
        raise stopped_early(stopped, checkpoint)

    # What the run leaves: the model, its state and card, the summary and the record's result.
    if data.eval is not None and recipe.values.get("do_eval") is not False:
        trainer.evaluate()
    if save:
        trainer.save_model(args.output_dir)
        trainer.create_model_card()
    trainer.save_state()  # trainer_state.json: the full loss history beside the model
    finish(trainer, recipe, data, state, save)
    del trainer
    leave_together()  # the group is torn down together, not under a process still writing


def start(recipe: Recipe) -> None:
    """What the resolved recipe decided, said; the Hub token handed over; what would doom the run, checked before any
    data or weights load."""
    for note in recipe.notes:
        logger.info(note)
    args = recipe.training
    if args.hub_token:  # the Hub client reads HF_TOKEN when the arguments hold none: no file the run writes holds it
        remember(args.hub_token, os.environ.get("HF_TOKEN"))
        os.environ["HF_TOKEN"] = args.hub_token
    check_trackers(args)  # report_to: known, installed, and where each writes, before any data is read
    preflight(recipe)


def ended_already(recipe: Recipe, state: PartialState) -> bool:
    """Whether the checkpoint to resume from is the run's end (then what a rerun does is done); a resume says where
    it goes on from."""
    args = recipe.training
    if args.resume_from_checkpoint is None:
        return False
    checkpoint = Path(args.resume_from_checkpoint)
    if at_end(checkpoint, args):
        rerun_of_an_ended_run(checkpoint, Path(args.output_dir), state.is_main_process)
        leave_together()
        return True
    step, last = trained_steps(checkpoint)
    logger.info("resuming from %s (step %d of %d)", checkpoint.name, step, args.max_steps if args.max_steps > 0
                else last)
    return False


def prepare(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, state: PartialState) -> PreparedData:
    """The rows prepared (``sftkit.data.preparation``), reported, and the skipped ones listed."""
    args = recipe.training
    data = prepare_data(recipe, tokenizer)
    logger.info("eval rows: %s", data.plan.eval_origin)
    for split in data.splits:
        logger.info("rows: %s", "\n  ".join(split.report.lines()))
    resuming = args.resume_from_checkpoint is not None
    if state.is_main_process and (skipped := data.write_skipped(args.output_dir, resuming)):
        logger.warning("%d invalid rows skipped (on_invalid: skip); listed in %s", skipped,
                       Path(args.output_dir) / SKIPPED_ROWS_FILE)
    return data


def build_trainer(recipe: Recipe, args: SFTConfig, data: PreparedData, rows: TrainerRows,
                  tokenizer: PreTrainedTokenizerBase, added_tokens: list[int], loss_path: str | None,
                  callbacks: Sequence[TrainerCallback]) -> SftkitTrainer:
    """SFTTrainer with sftkit's rules (order, bad-row policy, loss path and guard), attention, PEFT, compilation and
    collators in place."""
    if recipe.model.attn_implementation == "flex_attention":
        use_flex_attention_in_autocast_dtype()
    elif recipe.model.attn_implementation == VARLEN:
        use_varlen_attention()
    peft_config = get_peft_config(recipe.model)
    if peft_config is not None and added_tokens:  # the template's new tokens train their embeddings, as TRL does
        indices = dict(peft_config.trainable_token_indices or {})
        indices["embed_tokens"] = [*indices.get("embed_tokens", []), *added_tokens]
        peft_config.trainable_token_indices = indices
    rules = RunRules(
        order=EpochOrder(rows.keys, order_seed(args)), recipe_values=recipe.values,
        on_invalid=recipe.sftkit.on_invalid, max_invalid_fraction=recipe.sftkit.max_invalid_fraction,
        known_invalid=data.train.invalid_row_ids(), head_loss=loss_path,
        head_loss_chosen="lm_head_loss" in recipe.chosen_levers, grad_norm_limit=recipe.sftkit.grad_norm_limit,
        eval_by_source=rows.eval_by_source)
    trainer = SftkitTrainer(
        model=model_path(recipe), args=args, train_dataset=rows.train, eval_dataset=rows.eval,
        processing_class=copy.deepcopy(tokenizer),  # TRL re-applies the template to its copy and pads its vocabulary
        peft_config=peft_config, quantization_config=get_quantization_config(recipe.model), rules=rules,
        callbacks=[*callbacks, *output_callbacks(recipe, data, tokenizer),  # loss.png, sample answers
                   *trainjob_progress(recipe, args)],  # inside a TrainJob: its progress, in place of transformers'
    )
    if peft_config is not None:
        trainable = sum(parameter.numel() for parameter in trainer.model.parameters() if parameter.requires_grad)
        total = sum(parameter.numel() for parameter in trainer.model.parameters())
        logger.info("peft: %s trainable parameters of %s (%.2f%%)", f"{trainable:,}", f"{total:,}",
                    100 * trainable / total)
    if args.torch_compile:
        compiled = compile_decoder_layers(trainer.model, trainer.accelerator.state.dynamo_plugin)
        logger.info("speed: torch_compile: %d decoder layers compiled, each on its own", compiled)
    trainer.data_collator = _collator(trainer, recipe)
    end_of_turn = stop_on_end_of_turn(trainer.model.generation_config, tokenizer)
    if end_of_turn is not None:
        logger.info("generation stops at %r as well", tokenizer.convert_ids_to_tokens(end_of_turn))
    return trainer


def stopped_early(stopped: Stop, checkpoint: Path | None) -> SftkitError:
    """The error that ends a run stopped before max_steps: why, what was saved, and how to go on."""
    if stopped.cause == "loss guard":
        last_good = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved before it"
        return SftkitError(f"training stopped: {stopped.detail}; {last_good}. Resume from it with a lower "
                           "learning_rate (or a smaller max_grad_norm), or look at those rows first "
                           "(sftkit check shows how rows train).")
    if stopped.cause == "invalid rows":
        return SftkitError(f"training stopped: {stopped.detail}. The checkpoint {checkpoint} holds the last step; fix "
                           "the data or set on_invalid: skip, and resume with resume_from_checkpoint: auto.")
    return StoppedBySignal(f"stopped on {stopped.detail}, saved in {checkpoint}. Run the same command with "
                           f"resume_from_checkpoint: auto (or --resume_from_checkpoint {checkpoint}) to go on from "
                           "there.")


def finish(trainer: SftkitTrainer, recipe: Recipe, data: PreparedData, state: PartialState, save: bool) -> None:
    """The summary printed and the record's result written, from counts summed over every process."""
    output_dir = Path(recipe.training.output_dir)
    written = {"model": str(output_dir)} if save else {}
    written["run record"] = str(output_dir / RECORD_NAME)
    totals = trainer.totals()  # every process takes part
    if state.is_main_process:
        on_demand = data.train.on_demand is not None
        summary = summarise(trainer, totals, written, on_demand, data.accounts, data.train.report.noted)
        print(f"\nsftkit: training finished\n{summary}", flush=True)
        seen = {"rows_drawn": totals["rows_drawn"], "rows_invalid": totals["rows_invalid"]} if on_demand else {}
        add_to_run_record(str(output_dir), "result", {"steps": trainer.state.global_step, **seen,
                                                      "tokens_trained": totals["tokens_trained"]})


def trainer_arguments(recipe: Recipe, data: PreparedData) -> SFTConfig:
    """The recipe's training arguments as the trainer needs them once sftkit has prepared the data: a copy, so the
    recipe's own stay as the data was prepared from them."""
    args = copy.copy(recipe.training)
    # sftkit has tokenized, masked, truncated (and packs) the rows itself; TRL must not prepare them again.
    args.assistant_only_loss = False
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    args.model_init_kwargs = model_init_kwargs(recipe)
    args.remove_unused_columns = False  # the trainer's rows hold what the collators read, and row ids they pass on
    args.hub_token = None  # in every checkpoint's training_args.bin otherwise; the Hub client reads HF_TOKEN (train)
    if args.padding_free and not args.packing:  # TRL refuses rows it has not cut; sftkit has cut them to max_length
        args.max_length = None
    if "logging_nan_inf_filter" not in recipe.values:  # the loss guard stops at such a loss instead of hiding it
        args.logging_nan_inf_filter = False
    if data.eval is None and args.eval_strategy != IntervalStrategy.NO:
        logger.warning("eval_strategy is %s but there are no eval rows: set test_split_size", args.eval_strategy)
        args.eval_strategy = IntervalStrategy.NO
    return args


@dataclass
class TrainerRows:
    """What the trainer reads: the train rows laid out in the first epoch's order, the key of each (a row id, or a
    pack's number) that orders the later epochs, and the eval rows."""

    train: datasets.Dataset
    keys: np.ndarray
    eval: datasets.Dataset | None
    eval_by_source: dict[str, datasets.Dataset]  # a mixture's eval rows, source by source, by metric name


def trainer_rows(data: PreparedData, args: SFTConfig) -> TrainerRows:
    """The rows in training order (``sftkit.data.order``): every row, an invalid one keeping its place to be left out
    of its batch, or the valid ones packed window by window; the eval rows packed too unless eval_packing says
    otherwise."""
    seed = order_seed(args)
    if data.train.on_demand is not None:  # prepared on demand, already in training order
        train = data.train.on_demand
        keys = train.data.column("row").to_numpy()
    elif args.packing:
        ordered = valid_rows(in_training_order(data.train.rows, seed)).select_columns(["input_ids", "labels", "row"])
        train = pack_in_order(ordered, args.max_length, args.packing_strategy,
                              whole_windows_only=data.train.order_prefix)
        keys = np.arange(len(train))
    else:
        train = in_training_order(data.train.rows, seed).select_columns(["input_ids", "labels", "row"])
        keys = train.with_format("arrow")["row"].to_numpy()
    if data.eval is None:
        return TrainerRows(train, keys, None, {})
    packed = args.packing if args.eval_packing is None else args.eval_packing
    evaluation = valid_rows(data.eval.rows)
    sources = evaluation.with_format("arrow")["source_index"].to_numpy()
    by_source = {}
    if len(data.plan.sources) > 1:
        names = metric_names(data.plan.names)
        by_source = {name: evaluation.select(np.flatnonzero(sources == index)) for index, name in enumerate(names)
                     if (sources == index).any()}

    def trainable(rows: datasets.Dataset) -> datasets.Dataset:
        rows = rows.select_columns(["input_ids", "labels"])
        return pack_dataset(rows, args.max_length, args.packing_strategy) if packed else rows

    return TrainerRows(train, keys, trainable(evaluation), {name: trainable(rows) for name, rows in by_source.items()})


def _collator(trainer: SftkitTrainer, recipe: Recipe) -> Any:
    """TRL's collator, then: the tokens counted, one batch shape for torch.compile, invalid rows left out and passed
    on, and the ids of the rows trained. Padding uses TRL's pad token (the EOS of a tokenizer without one)."""
    collator, args = trainer.data_collator, recipe.training
    pad_token_id = collator.pad_token_id
    fixed_shape = recipe.sftkit.fixed_batch_shape
    if fixed_shape and not collator.padding_free:
        collator.pad_to_multiple_of = args.max_length  # rows padded to max_length; the attention mask hides it
    collator = CountingCollator(collator, positions=trainer.head_loss is not None)
    if fixed_shape and trainer.data_collator.padding_free:  # after counting: the padding is not a token seen
        collator = FixedShapeCollator(collator, args.per_device_train_batch_size * args.max_length, pad_token_id)
    return SkippingCollator(collator, pad_token_id)


def head_loss(recipe: Recipe) -> str | None:
    """The path asked to compute the training loss (a kernel, ``logits`` or ``trl``; the trainer checks it against
    the loaded model's head), or None where only TRL's own loss computes what the recipe asks."""
    chosen, args, targets = recipe.sftkit.lm_head_loss, recipe.training, recipe.model.lora_target_modules
    if recipe.model.use_peft and targets is not None and (
            "lm_head" in targets if isinstance(targets, list) else re.fullmatch(targets, "lm_head")):
        # TRL's SFTTrainer would refuse it only once the model is loaded and the data prepared.
        raise SftkitError("lora_target_modules includes lm_head: TRL computes the loss from lm_head.weight directly, "
                          "so a LoRA adapter on the LM head would never train, and TRL refuses it. Remove lm_head "
                          "from lora_target_modules; to train the head, list it in lora_modules_to_save instead "
                          "(trained in full).")
    if args.loss_type != "nll" or args.label_smoothing_factor:  # losses of the whole distribution: TRL's head has it
        if chosen != "trl":
            logger.info("speed: lm_head_loss %s computes the plain cross-entropy; loss_type %s and "
                        "label_smoothing_factor %g need TRL's fused head (lm_head_loss: trl), which is used", chosen,
                        args.loss_type, args.label_smoothing_factor)
        return None
    if is_deepspeed_zero3_enabled() and chosen in KERNELS:  # the head's weight is sharded outside its own forward
        logger.info("speed: lm_head_loss %s computes the loss from the head's weight, which ZeRO-3 shards; using "
                    "TRL's fused head (lm_head_loss: trl), which gathers it", chosen)
        return "trl"
    return chosen
