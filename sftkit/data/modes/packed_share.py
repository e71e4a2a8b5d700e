"""Packed share: a bounded run that packs needs each row's length before step 1, so rows are taken in training
order and prepared in cached chunks that double (the same chunks whatever ``max_steps`` is) until their whole
packing windows fill the sequences ``max_steps`` trains on, or the data runs out. The eval rows are prepared
eagerly."""

from __future__ import annotations

import logging

import datasets
import numpy as np

from sftkit.data.modes.eager import prepare_eval, prepare_splits
from sftkit.data.order import PACKING_WINDOW, in_training_order, order_seed, pack_in_order, training_order
from sftkit.data.passes import rows_per_run
from sftkit.data.plan import Plan, SplitPlan
from sftkit.data.prepared import Prepared, SplitRows, valid_rows
from sftkit.recipe import Recipe

logger = logging.getLogger(__name__)


def prepare(plan: Plan, recipe: Recipe) -> Prepared:
    """A prefix of the training order that fills the run's sequences; the render guard samples the first chunk."""
    args, needed = recipe.training, rows_per_run(recipe)
    order = training_order(plan.train_ids(), order_seed(args))
    chunks, rendered, from_cache, taken, size = [], 0, False, 0, PACKING_WINDOW
    while True:
        ids = np.sort(order[taken:taken + size])
        chunk, chunk_rendered, chunk_from_cache = prepare_splits(
            plan, {"train": SplitPlan("train", ids)}, recipe, recipe.sftkit.render_check_rows if not chunks else 0)
        if not chunks:
            rendered, from_cache = chunk_rendered, chunk_from_cache
        chunks.append(chunk["train"].rows)
        taken, size = taken + len(ids), size * 2
        rows = datasets.concatenate_datasets(chunks)
        order_prefix = taken < len(order)
        packs = pack_in_order(valid_rows(in_training_order(rows, order_seed(args))), args.max_length,
                              args.packing_strategy, whole_windows_only=order_prefix)
        if len(packs) >= needed or not order_prefix:
            logger.info("packed share: %s rows prepared fill %s sequences (%s needed)", f"{taken:,}",
                        f"{len(packs):,}", f"{needed:,}")
            break
    evaluation, eval_rendered, eval_from_cache = prepare_eval(plan, recipe)
    return Prepared(SplitRows(rows, plan.rows("train")), evaluation, rendered + eval_rendered,
                    from_cache or eval_from_cache, order_prefix=order_prefix)
