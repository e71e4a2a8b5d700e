"""The data path as one chain: load -> adapt -> validate. Tokenising and packing follow in the trainer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from sftkit import plugins
from sftkit.adapt import adapt, choose_adapter, resolve_options
from sftkit.plugins import InstalledAdapter
from sftkit.recipe import Recipe
from sftkit.render_guard import check_rendering
from sftkit.sources import load_splits

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    adapter: InstalledAdapter
    adapter_reason: str
    options: dict[str, Any]
    eval_origin: str
    rows_checked: int

    def describe(self) -> dict[str, Any]:
        """What the run record says about the data."""
        return {
            "adapter": {
                "name": self.adapter.adapter.name,
                "distribution": self.adapter.distribution,
                "version": self.adapter.version,
                "chosen": self.adapter_reason,
                "options": self.options,
            },
            "data": {
                "train_rows": self.train.num_rows,
                "eval_rows": self.eval.num_rows if self.eval is not None else 0,
                "eval": self.eval_origin,
                "render_guard_rows": self.rows_checked,
            },
        }


def prepare_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Load the raw rows, convert them with the chosen adapter, and check what the chat template makes of them."""
    raw = load_splits(recipe)
    installed, reason = choose_adapter(recipe.sftkit.dataset_format, raw.train, plugins.registry())
    logger.info("adapter: %s from %s %s (%s)", installed.adapter.name, installed.distribution, installed.version, reason)
    options = resolve_options(installed.adapter, recipe.sftkit.dataset_options)
    train = adapt(raw.train, installed, options, "train")
    evaluation = adapt(raw.eval, installed, options, "eval") if raw.eval is not None else None
    rows = recipe.sftkit.render_check_rows
    checked = check_rendering(train, tokenizer, recipe.training, rows, "train")
    if evaluation is not None:
        checked += check_rendering(evaluation, tokenizer, recipe.training, rows, "eval")
    logger.info("render guard: %d sampled examples render every turn and train on at least one token", checked)
    return PreparedData(train, evaluation, installed, reason, options, raw.eval_origin, checked)
