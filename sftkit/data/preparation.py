"""The data of a run: load -> plan -> prepare -> the bad-row policy and the accounts.

Every source is loaded once (``sftkit.data.sources``); the plan (``sftkit.data.plan``) gives each its adapter and
row chain and says which rows each split takes; one way of preparing (``sftkit.data.modes``: eager, lazy, packed
share, streamed) takes them through the row chain, the render guard on a sample first; then, once, the rows are
reported, the bad-row policy enforced and each source accounted for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from sftkit.data import streaming
from sftkit.data.account import account_split, check_shares
from sftkit.data.bad_rows import enforce, report_rows
from sftkit.data.modes import eager, lazy, packed_share, streamed
from sftkit.data.passes import rows_per_run
from sftkit.data.plan import Plan, choose_adapters, first_record, loaded_plan, plan_rows, plan_stream
from sftkit.data.prepared import Preparation, Prepared, PreparedData, PreparedSplit
from sftkit.data.rows import RowChain
from sftkit.data.sources import load_sources
from sftkit.data.templates import rendering_tokenizer, reply_end, require_chat_template
from sftkit.data.tokenization import TokenizeSettings
from sftkit.errors import SftkitError
from sftkit.recipe import Recipe

logger = logging.getLogger(__name__)

MODES: dict[Preparation, Callable[[Plan, Recipe], Prepared]] = {
    Preparation.EAGER: eager.prepare,
    Preparation.LAZY: lazy.prepare,
    Preparation.PACKED_SHARE: packed_share.prepare,
    Preparation.STREAMED: streamed.prepare,
}


def preparation_mode(recipe: Recipe, train_rows: int) -> tuple[Preparation, str]:
    """Streamed for a stream; else lazy when a bounded run reads less than the dataset, a packed share when it packs,
    else eager; and why."""
    asked, args = recipe.sftkit.prepare, recipe.training
    if streaming.is_streaming(recipe):
        return Preparation.STREAMED, (f"max_steps reads {rows_per_run(recipe):,} rows from the stream, "
                                      f"{streaming.WINDOW:,} rows shuffled at a time")
    if asked != "auto":
        if asked == Preparation.LAZY and args.packing:
            raise SftkitError("prepare: lazy cannot pack (packing needs each row's length before step 1); use "
                              "prepare: auto (a bounded run prepares only the rows it packs) or eager")
        return Preparation(asked), "as the recipe says"
    if args.max_steps <= 0:
        return Preparation.EAGER, "the run reads every row (num_train_epochs)"
    needed = rows_per_run(recipe)
    if args.packing:
        return Preparation.PACKED_SHARE, (
            f"max_steps packs {needed:,} sequences of up to {args.max_length} tokens: rows drawn at random from "
            f"{train_rows:,} and prepared before step 1, until they fill them")
    if needed >= train_rows:
        return Preparation.EAGER, f"max_steps reads {needed:,} rows, the whole dataset"
    return Preparation.LAZY, f"max_steps reads {needed:,} of {train_rows:,} rows"


def _plan(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> Plan:
    """Every source loaded, its adapter chosen and its row chain made, and the rows each split takes."""
    sources = load_sources(recipe)
    choices = choose_adapters(sources)
    tokenizer, note = rendering_tokenizer(tokenizer)
    for line in (note, reply_end(tokenizer)[2]):
        if line:
            logger.info(line)
    settings = TokenizeSettings.from_recipe(recipe, tokenizer)
    loaded = [loaded_plan(source, choice, RowChain(choice.installed.adapter, choice.options, tokenizer, settings))
              for source, choice in zip(sources, choices, strict=True)]
    require_chat_template(tokenizer, first_record(loaded), recipe.model.model_name_or_path)
    return plan_stream(recipe, loaded) if streaming.is_streaming(recipe) else plan_rows(recipe, loaded)


def _checked(recipe: Recipe, prepared: Prepared, enforce_policy: bool) -> dict[str, PreparedSplit]:
    """Each prepared split reported, and the bad-row policy enforced on it."""
    check_rows = recipe.sftkit.render_check_rows
    if prepared.from_cache:
        logger.info("prepared rows loaded from the cache (their rendering was checked when they were prepared)")
    if prepared.rendered:
        logger.info("render guard: every turn of %d sampled conversations appears in the chat template's rendering",
                    prepared.rendered)
    elif not check_rows:
        logger.info("render guard: off (render_check_rows: 0); every row is still checked as it is prepared")
    splits = {}
    for name, rows in (("train", prepared.train), ("eval", prepared.eval)):
        if rows is None:
            continue
        sample = name == "train" and prepared.on_demand is not None
        report = report_rows(rows.rows, "train sample" if sample else name, rows.parts)
        if enforce_policy:
            enforce(report, recipe.sftkit.on_invalid, recipe.sftkit.max_invalid_fraction)
        splits[name] = PreparedSplit(name, rows.rows, rows.parts, report, prepared.on_demand if sample else None,
                                     prepared.order_prefix and name == "train")
    return splits


def prepare_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, enforce_policy: bool = True) -> PreparedData:
    """Load every source, plan its rows, take them through the row chain, apply the bad-row policy; the render
    guard first.

    ``tokenizer`` is the run's, settled (chat template, special tokens) before any row is prepared.
    """
    plan = _plan(recipe, tokenizer)
    mode, why = preparation_mode(recipe, len(plan.train_ids()))
    logger.info("preparation: %s (%s)", mode.value, why)
    prepared = MODES[mode](plan, recipe)
    splits = _checked(recipe, prepared, enforce_policy)
    accounts = [account for split in splits.values() for account in account_split(
        split, plan.names, plan.asked if split.name == "train" else None, recipe.training.max_length,
        sample=split.on_demand is not None)]
    check_shares([account for account in accounts if account.split == "train"])
    return PreparedData(splits["train"], splits.get("eval"), plan, mode, why, prepared.rendered,
                        prepared.from_cache, accounts)
