"""The data path as one chain: load -> adapt -> tokenize and mask -> bad-row policy -> render guard."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from sftkit import plugins
from sftkit.adapt import adapt, choose_adapter, resolve_options
from sftkit.bad_rows import RowReport, enforce, report_rows, write_skipped
from sftkit.errors import SftkitError
from sftkit.plugins import InstalledAdapter
from sftkit.recipe import Recipe
from sftkit.render_guard import check_rendering
from sftkit.sources import Source, load_sources
from sftkit.tokenization import TokenizeSettings, tokenize_split

logger = logging.getLogger(__name__)


@dataclass
class AdapterChoice:
    source: str
    installed: InstalledAdapter
    reason: str
    options: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        adapter = self.installed
        return {"source": self.source, "name": adapter.adapter.name, "distribution": adapter.distribution,
                "version": adapter.version, "chosen": self.reason, "options": self.options}


@dataclass
class PreparedSplit:
    """Every row of a split, valid or not, with its record, tokens and, if invalid, why."""

    name: str
    rows: datasets.Dataset
    report: RowReport

    def trainable(self) -> datasets.Dataset:
        """Only what the trainer needs: the valid rows' input_ids and labels."""
        valid = self.rows.filter(lambda reasons: [reason is None for reason in reasons], batched=True,
                                 input_columns="invalid", desc=f"Selecting valid {self.name} rows")
        return valid.select_columns(["input_ids", "labels"])


@dataclass
class PreparedData:
    train: PreparedSplit
    eval: PreparedSplit | None
    adapters: list[AdapterChoice]
    sources: list[Source]
    eval_origin: str
    rows_checked: int

    def describe(self) -> dict[str, Any]:
        """What the run record says about the data."""
        splits = [split for split in (self.train, self.eval) if split is not None]
        return {
            "adapter": self.adapters[0].describe() if len(self.adapters) == 1 else [a.describe() for a in self.adapters],
            "data": {
                **{f"{split.name}_rows": split.report.valid for split in splits},
                "invalid_rows": {split.name: dict(split.report.invalid) for split in splits},
                "eval": self.eval_origin,
                "render_guard_rows": self.rows_checked,
            },
        }

    def write_skipped(self, output_dir: str) -> int:
        """List every skipped row, its reason and its raw content in ``output_dir/skipped_rows.jsonl``."""
        path = Path(output_dir) / "skipped_rows.jsonl"
        path.unlink(missing_ok=True)
        written = 0
        for split in (self.train, self.eval):
            if split is not None:
                written += write_skipped(split.rows, self.sources, split.name, path)
        return written


def _adapt_source(source: Source, index: int, dataset: datasets.Dataset, choice: AdapterChoice,
                  split: str) -> datasets.Dataset:
    adapted = adapt(dataset, choice.installed, choice.options, split)
    adapted = adapted.add_column("source", [index] * adapted.num_rows)
    adapted = adapted.add_column("source_split", [split] * adapted.num_rows)
    return adapted.add_column("source_row", list(range(adapted.num_rows)))


def split_held_out(train: datasets.Dataset, recipe: Recipe) -> tuple[datasets.Dataset, datasets.Dataset | None, str]:
    size = recipe.mixture.test_split_size
    if not size:
        return train, None, "none"
    size = int(size) if size >= 1 else size
    seed = recipe.training.seed
    parts = train.train_test_split(test_size=size, seed=seed, shuffle=True)
    origin = f"{parts['test'].num_rows} rows held out of the training data (test_split_size {size}, seed {seed})"
    return parts["train"], parts["test"], origin


def prepare_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, enforce_policy: bool = True) -> PreparedData:
    """Load every source, convert it with its adapter, tokenize, apply the bad-row policy, check the rendering."""
    sources = load_sources(recipe)
    registry = plugins.registry()
    choices, train_parts, eval_parts = [], [], []
    for index, source in enumerate(sources):
        try:
            installed, reason = choose_adapter(source.dataset_format, source.train, registry)
            options = resolve_options(installed.adapter, source.dataset_options)
        except SftkitError as error:
            if len(sources) == 1:
                raise
            raise SftkitError(f"datasets[{index}] ({source.name}): {error}") from None
        choice = AdapterChoice(source.name, installed, reason, options)
        logger.info("adapter for %s: %s from %s %s (%s)", source.name, installed.adapter.name,
                    installed.distribution, installed.version, reason)
        choices.append(choice)
        train_parts.append(_adapt_source(source, index, source.train, choice, "train"))
        if source.eval is not None:
            eval_parts.append(_adapt_source(source, index, source.eval, choice, "eval"))
    train = datasets.concatenate_datasets(train_parts)
    if eval_parts:
        evaluation, origin = datasets.concatenate_datasets(eval_parts), f"split {recipe.script.dataset_test_split!r}"
    else:
        train, evaluation, origin = split_held_out(train, recipe)

    settings = TokenizeSettings.from_recipe(recipe, tokenizer)
    num_proc = recipe.training.dataset_num_proc
    sftkit = recipe.sftkit
    splits: list[PreparedSplit] = []
    for name, rows in (("train", train), ("eval", evaluation)):
        if rows is None:
            continue
        rows = tokenize_split(rows, tokenizer, settings, name, num_proc)
        report = report_rows(rows, name)
        if enforce_policy:
            enforce(report, sftkit.on_invalid, sftkit.max_invalid_fraction)
        splits.append(PreparedSplit(name, rows, report))

    checked = sum(check_rendering(split.rows, tokenizer, sftkit.render_check_rows, split.name) for split in splits)
    if checked:
        logger.info("render guard: every turn of %d sampled conversations appears in the chat template's rendering",
                    checked)
    return PreparedData(splits[0], splits[1] if len(splits) > 1 else None, choices, sources, origin, checked)
