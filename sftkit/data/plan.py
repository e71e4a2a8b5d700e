"""The plan of a run's rows, made once before any row is prepared: each source with the adapter and row chain that
read it, the rows each split takes of it (all of them, a mixture's draw, a held-out part, the dataset's own test
split), and which of those rows each prepared split holds, by global row id.

A row's global id is its place among every source's train rows, one source after another; the eval rows of a
source are numbered from the same place. Every way of preparing rows (``sftkit.data.modes``) reads this plan.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import datasets
import numpy as np

from sftkit import plugins
from sftkit.contract import RowError
from sftkit.data.adapt import check_columns, choose_adapter, options_record, resolve_options
from sftkit.data.bad_rows import row_name
from sftkit.data.mixture import Draw, draw_mixture
from sftkit.data.order import order_seed
from sftkit.data.rows import RowChain
from sftkit.data.sources import Source
from sftkit.errors import SftkitError
from sftkit.plugins import InstalledAdapter
from sftkit.recipe import Recipe

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterChoice:
    source_name: str
    installed: InstalledAdapter
    reason: str
    options: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        adapter = self.installed
        return {"source": self.source_name, "name": adapter.adapter.name, "distribution": adapter.distribution,
                "version": adapter.version, "chosen": self.reason, "options": options_record(self.options)}


@dataclass(frozen=True)
class SourceRows:
    """The rows of one source that a split takes, in order, with the chain that prepares them. Where they are a
    selection of the loaded rows (a mixture's draw, repeats included), ``lines`` says which loaded row each is:
    users see a row by its place in what was loaded (its line in a file)."""

    name: str
    chain: RowChain
    rows: datasets.Dataset
    lines: np.ndarray | None = None

    def __len__(self) -> int:
        return self.rows.num_rows

    def line(self, position: int) -> int:
        return int(self.lines[position]) if self.lines is not None else position

    def row_name(self, position: int) -> str:
        return row_name(self.name, self.line(position))

    def record(self, position: int) -> dict[str, Any]:
        """The canonical record of a row, made again from its raw row by the chain."""
        return self.chain.record(self.rows[position])

    def selected(self, positions: np.ndarray) -> SourceRows:
        """These rows' ``positions`` alone, still named by their loaded rows."""
        lines = positions if self.lines is None else self.lines[positions]
        return SourceRows(self.name, self.chain, self.rows.select(positions), lines)


@dataclass(frozen=True)
class SourcePlan:
    """One source of the run: as loaded, the adapter that reads it, and the rows each split takes of it."""

    source: Source
    adapter: AdapterChoice
    train: SourceRows
    eval: SourceRows | None
    fingerprint: str  # what its planned rows are, for the preparation cache's key
    draw: Draw | None = None  # what a mixture with fractions drew from it

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def chain(self) -> RowChain:
        return self.train.chain

    def rows(self, split: str) -> SourceRows | None:
        """Its rows of the source split ``split`` ("train" or "eval")."""
        return self.train if split == "train" else self.eval


@dataclass(frozen=True)
class SplitPlan:
    """The rows of a prepared split: of each source's ``source_split`` rows, those whose global id is in ``ids``
    (every one when None)."""

    source_split: str
    ids: np.ndarray | None = None


@dataclass(frozen=True)
class Plan:
    """Every source's plan, the train and eval rows by id, where the eval rows come from, and the share of the
    trained tokens a mixture asks of each source."""

    sources: tuple[SourcePlan, ...]
    train: SplitPlan
    eval: SplitPlan | None
    eval_origin: str
    asked: list[float] | None = None

    @property
    def names(self) -> list[str]:
        return [source.name for source in self.sources]

    @property
    def adapters(self) -> list[AdapterChoice]:
        return [source.adapter for source in self.sources]

    def rows(self, split: str) -> tuple[SourceRows | None, ...]:
        """Each source's rows of the source split ``split``."""
        return tuple(source.rows(split) for source in self.sources)

    def offsets(self) -> np.ndarray:
        """Where each source's global ids begin (its train rows follow those of the sources before it)."""
        return np.cumsum([0] + [len(source.train) for source in self.sources])

    def train_ids(self) -> np.ndarray:
        return self.train.ids if self.train.ids is not None else np.arange(self.offsets()[-1])


# ---------------------------------------------------------------- each source, its adapter and chain


def choose_adapters(sources: Sequence[Source]) -> list[AdapterChoice]:
    """Each source's adapter and options, chosen on its loaded train rows."""
    registry = plugins.registry()
    choices = []
    for index, source in enumerate(sources):
        try:
            installed, reason, detected = choose_adapter(source.dataset_format, source.train, registry)
            options = resolve_options(installed.adapter, {**detected, **source.dataset_options})
            check_columns(installed, options, source.train, source.name)
        except SftkitError as error:
            if len(sources) == 1:
                raise
            raise SftkitError(f"datasets[{index}] ({source.name}): {error}") from None
        logger.info("adapter for %s: %s from %s %s (%s)", source.name, installed.adapter.name,
                    installed.distribution, installed.version, reason)
        choices.append(AdapterChoice(source.name, installed, reason, options))
    return choices


def loaded_plan(source: Source, adapter: AdapterChoice, chain: RowChain) -> SourcePlan:
    """A source's plan before any selection: every loaded train row, and its own test split."""
    evaluation = SourceRows(source.name, chain, source.eval) if source.eval is not None else None
    return SourcePlan(source, adapter, SourceRows(source.name, chain, source.train), evaluation, source.fingerprint)


def first_record(sources: Sequence[SourcePlan]) -> dict[str, Any] | None:
    """The first of a few rows of the first source that its adapter converts: what kind of records the run has."""
    train = sources[0].train
    for position in range(min(16, len(train))):
        try:
            return train.record(position)
        except RowError:
            continue
    return None


# ---------------------------------------------------------------- which rows each split takes


def split_held_out(total: int, recipe: Recipe) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Train and eval row ids over all sources' train rows: a seeded held-out part when test_split_size asks."""
    size, seed = recipe.mixture.test_split_size, recipe.training.seed
    every = np.arange(total)
    if not size:
        return every, None, "none"
    count = int(size) if size >= 1 else max(1, round(size * total))
    if count >= total:
        raise SftkitError(f"test_split_size {size} leaves no training rows out of {total}")
    order = np.random.default_rng(seed).permutation(total)
    origin = f"{count} rows held out of the training data (test_split_size {size}, seed {seed})"
    return np.sort(order[count:]), np.sort(order[:count]), origin


def _asked(sources: Sequence[SourcePlan]) -> list[float] | None:
    """Each source's share of the trained tokens, normalised, where the mixture sets fractions."""
    fractions = [source.source.fraction for source in sources]
    return None if None in fractions else (np.asarray(fractions, dtype=float) / sum(fractions)).tolist()


def _drawn(recipe: Recipe, sources: Sequence[SourcePlan]) -> list[SourcePlan]:
    """Each source's rows as a mixture with fractions draws them (``sftkit.data.mixture``): its training rows at its
    share of the trained tokens, its held-out rows first."""
    how, seed = recipe.sftkit.mixture, order_seed(recipe.training)
    draws = draw_mixture([source.name for source in sources], [source.source.train for source in sources],
                         [source.chain for source in sources], [source.source.fraction for source in sources], how,
                         recipe.mixture.test_split_size, seed)
    drawn = []
    for source, draw in zip(sources, draws, strict=True):
        logger.info("mixture: %s", draw.describe(source.name))
        evaluation = source.train.selected(draw.eval_rows) if draw.eval_rows is not None else source.eval
        drawn.append(replace(source, train=source.train.selected(draw.train_rows), eval=evaluation, draw=draw,
                             fingerprint=f"{source.fingerprint}|mixture {how} seed {seed}: {draw.drawn} rows, "
                                         f"{draw.held_out} held out"))
    return drawn


def plan_rows(recipe: Recipe, sources: Sequence[SourcePlan]) -> Plan:
    """The rows of a run read whole: a mixture's draw, then the eval rows (held out of the train rows, or the
    dataset's own test split)."""
    if any(source.source.fraction is not None for source in sources):
        sources = _drawn(recipe, sources)
    draws = [source.draw for source in sources if source.draw is not None]
    total = sum(len(source.train) for source in sources)
    has_own_eval = any(source.eval is not None for source in sources)
    if draws:
        train_ids, eval_ids = None, None
        origin = (f"{sum(draw.held_out for draw in draws)} rows held out of the sources, each its part "
                  f"(test_split_size {recipe.mixture.test_split_size}, seed {order_seed(recipe.training)})"
                  if has_own_eval else "none")
    elif has_own_eval:
        train_ids, eval_ids, origin = None, None, f"split {recipe.script.dataset_test_split!r}"
    else:
        train_ids, eval_ids, origin = split_held_out(total, recipe)
        train_ids = train_ids if eval_ids is not None else None
    evaluation = SplitPlan("train", eval_ids) if eval_ids is not None else SplitPlan("eval") if has_own_eval else None
    return Plan(tuple(sources), SplitPlan("train", train_ids), evaluation, origin, _asked(sources))


def plan_stream(recipe: Recipe, sources: Sequence[SourcePlan]) -> Plan:
    """The rows of a streamed run: the trainer's are read from the stream as it draws them; the held-out ones are
    each source's first ``test_split_size`` rows, or a dataset's own test split."""
    held_out = int(recipe.mixture.test_split_size or 0)
    planned = []
    for source in sources:
        if source.eval is None and held_out:
            head = datasets.Dataset.from_list(list(itertools.islice(iter(source.source.stream), held_out)))
            source = replace(source, eval=SourceRows(source.name, source.chain, head))
        planned.append(source)
    has_eval = any(source.eval is not None for source in planned)
    origin = ("none" if not has_eval else f"each source's first {held_out} rows (test_split_size)" if held_out
              else f"split {recipe.script.dataset_test_split!r}")
    return Plan(tuple(planned), SplitPlan("train"), SplitPlan("eval") if has_eval else None, origin,
                _asked(planned))
