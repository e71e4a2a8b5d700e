"""The training job, top to bottom: recipe -> data (load, adapt, tokenize, validate) -> record -> SFTTrainer -> model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from accelerate import PartialState
from transformers import TrainerCallback
from trl import get_peft_config, get_quantization_config, pack_dataset

from sftkit.attention import use_flex_attention_in_autocast_dtype
from sftkit.data import prepare_data
from sftkit.errors import SftkitError
from sftkit.fixed_shape import fix_batch_shape
from sftkit.launcher import partial_batch_note
from sftkit.lazy import SkippingCollator
from sftkit.model import load_tokenizer, model_init_kwargs, model_path, stop_on_end_of_turn
from sftkit.recipe import Recipe, number_of_processes
from sftkit.run_record import add_to_run_record, write_run_record
from sftkit.summary import summarise
from sftkit.trainer import SftkitTrainer

logger = logging.getLogger(__name__)


def train(recipe: Recipe, callbacks: Sequence[TrainerCallback] = ()) -> None:
    """Run one supervised fine-tuning job as the recipe describes it (``callbacks`` observe it, e.g. benchmarks)."""
    state = PartialState(cpu=recipe.training.use_cpu)
    for note in recipe.notes:
        logger.info(note)
    args = recipe.training
    output_dir = Path(args.output_dir)

    # Data. Processes wait for each other on the cache's file lock, never on a collective with a timeout.
    tokenizer = load_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer)
    logger.info("eval rows: %s", data.eval_origin)
    for split in (data.train, data.eval):
        if split is not None:
            logger.info("rows: %s", "\n  ".join(split.report.lines()))
    if state.is_main_process and (skipped := data.write_skipped(args.output_dir)):
        logger.warning("%d invalid rows skipped (on_invalid: skip); listed in %s/skipped_rows.jsonl", skipped,
                       args.output_dir)
    train_rows = data.train.trainable()
    note = partial_batch_note(len(train_rows), args.per_device_train_batch_size,
                              args.gradient_accumulation_steps, args.max_steps, state.num_processes,
                              args.dataloader_drop_last)
    if note:
        logger.warning(note)
    if data.eval is None and args.eval_strategy != "no":
        logger.warning("eval_strategy is %s but there are no eval rows: set test_split_size", args.eval_strategy)
        args.eval_strategy = "no"

    # The run record is written before the first step, so even a crashed run says what it was.
    args.model_init_kwargs = model_init_kwargs(recipe)
    if state.is_main_process:
        details = {"processes": number_of_processes(), **data.describe()}
        record = write_run_record(args.output_dir, recipe.values, details)
        logger.info("run record: %s", record)

    if recipe.model.attn_implementation == "flex_attention":
        use_flex_attention_in_autocast_dtype()
    # sftkit has tokenized, masked, truncated (and packs) the rows itself; TRL must not prepare them again.
    args.assistant_only_loss = False
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    if data.train.lazy is not None:
        args.remove_unused_columns = False  # the lazy rows are made from a "row" column the model never sees
    if args.packing:
        train_rows = pack_dataset(train_rows, args.max_length, args.packing_strategy)
    trainer = SftkitTrainer(
        model=model_path(recipe),
        args=args,
        train_dataset=train_rows,
        eval_dataset=data.eval.trainable() if data.eval is not None else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(recipe.model),
        quantization_config=get_quantization_config(recipe.model),
        on_invalid=recipe.sftkit.on_invalid,
        max_invalid_fraction=recipe.sftkit.max_invalid_fraction,
        known_invalid=data.train.invalid_row_ids() if data.train.lazy is not None else None,
        callbacks=list(callbacks),
    )
    if recipe.sftkit.fixed_batch_shape:
        trainer.data_collator = fix_batch_shape(trainer.data_collator, args.max_length,
                                                args.per_device_train_batch_size, tokenizer.pad_token_id)
    if data.train.lazy is not None:  # rows prepared on demand: invalid ones reach the trainer's policy by name
        trainer.data_collator = SkippingCollator(trainer.data_collator, tokenizer.pad_token_id)
    end_of_turn = stop_on_end_of_turn(trainer.model.generation_config, tokenizer)
    if end_of_turn is not None:
        logger.info("generation stops at %r as well", tokenizer.convert_ids_to_tokens(end_of_turn))

    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if trainer.policy_stop:
        raise SftkitError(f"training stopped: {trainer.policy_stop}. A checkpoint of the last step is in "
                          f"{args.output_dir}; fix the data or set on_invalid: skip, and resume with "
                          "resume_from_checkpoint.")
    if data.eval is not None:
        trainer.evaluate()
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: the full loss history beside the model

    written = {"model": str(output_dir), "run record": str(output_dir / "sftkit_run.yaml")}
    totals = trainer.totals()  # every process takes part
    if state.is_main_process:
        lazy = data.train.lazy is not None
        print(f"\nsftkit: training finished\n{summarise(trainer, totals, written, lazy)}", flush=True)
        seen = {"rows_drawn": totals["rows_drawn"], "rows_invalid": totals["rows_invalid"]} if lazy else {}
        add_to_run_record(args.output_dir, "result", {"steps": trainer.state.global_step, **seen,
                                                      "tokens_trained": totals["tokens_trained"]})
    trainer.accelerator.wait_for_everyone()  # the group is torn down together, not under a rank still writing
    trainer.end()
