"""Lazy: only a sample spread over the trainer's rows is prepared before step 1, to check and report; the trainer's
rows are prepared on demand, as it draws them (``sftkit.data.on_demand``; used when ``max_steps`` reads less than
the whole dataset). The eval rows are prepared eagerly."""

from __future__ import annotations

from dataclasses import replace

from sftkit.data.cache import code_digest, preparation_key
from sftkit.data.modes.eager import prepare_eval
from sftkit.data.on_demand import on_demand_rows
from sftkit.data.order import order_seed, training_order
from sftkit.data.passes import SAMPLE_ROWS, planned_parts, prepared, run_render_guard
from sftkit.data.plan import Plan, SplitPlan
from sftkit.data.prepared import Prepared, SplitRows
from sftkit.data.render_guard import sample_indices
from sftkit.recipe import Recipe


def prepare(plan: Plan, recipe: Recipe) -> Prepared:
    """The trainer's rows in training order, each prepared when drawn, and a prepared sample spread over them."""
    train_ids = plan.train_ids()
    sample = train_ids[sample_indices(len(train_ids), SAMPLE_ROWS)]
    planned = planned_parts(plan, SplitPlan("train", sample))
    rendered = run_render_guard(planned, recipe.sftkit.render_check_rows, "train")
    key = preparation_key({"sources": [source.fingerprint for source in plan.sources], "sample": sample.tolist()},
                          code=code_digest(type(choice.installed.adapter) for choice in plan.adapters))
    rows = prepared(planned, "train sample", key, None)
    drawn = [replace(part, rows=part.rows.select_columns([column for column in part.chain.read
                                                          if column in part.rows.column_names]))
             for part in plan.rows("train")]
    on_demand = on_demand_rows(drawn, training_order(train_ids, order_seed(recipe.training)))
    evaluation, eval_rendered, from_cache = prepare_eval(plan, recipe)
    return Prepared(SplitRows(rows, plan.rows("train")), evaluation, rendered + eval_rendered, from_cache, on_demand)
