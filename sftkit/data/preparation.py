"""The data of a run: load -> the row chain (adapt, check, render, tokenize, mask; ``sftkit.data.rows``) -> the
bad-row policy, with the render guard on a sample before anything is prepared.

Three ways through it (``Preparation``), all through the same row chain. Eager: every row, in batched
passes over all cores, cached on disk by a key of everything that changes the result (used when the
run reads the whole dataset). Lazy: only a sample is prepared before step 1, to check and report; the
trainer's rows are prepared on demand, as it draws them (used when ``max_steps`` reads less than the
whole dataset). Packed share: a bounded run that packs needs each row's length first, so rows drawn at
random are prepared in cached chunks until they fill the sequences ``max_steps`` trains on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from sftkit import plugins
from sftkit.contract import RowError
from sftkit.data import streaming
from sftkit.data.account import SourceAccount, account_split, check_shares
from sftkit.data.adapt import check_columns, choose_adapter, options_record, resolve_options
from sftkit.data.bad_rows import RowReport, enforce, report_rows, row_name, write_skipped
from sftkit.data.cache import cached, code_digest, preparation_key
from sftkit.data.mixture import Draw, draw_mixture
from sftkit.data.on_demand import OnDemandSource, on_demand_rows
from sftkit.data.order import PACKING_WINDOW, in_training_order, order_seed, pack_in_order, training_order
from sftkit.data.render_guard import check_rendering, sample_indices
from sftkit.data.rows import RowChain, prepare_rows
from sftkit.data.sources import Source, load_sources
from sftkit.data.templates import rendering_tokenizer, reply_end, require_chat_template
from sftkit.data.tokenization import TokenizeSettings
from sftkit.errors import SftkitError
from sftkit.hardware import usable_cpus
from sftkit.plugins import InstalledAdapter
from sftkit.recipe import Recipe, number_of_processes

logger = logging.getLogger(__name__)

PARALLEL_FROM_ROWS = 20_000  # below this, a process pool costs more than it saves
PREFLIGHT_ROWS = 256  # rows a lazy run prepares before step 1, to check and report


class Preparation(str, Enum):
    """How a run's rows are prepared: the recipe's ``prepare`` (``auto`` picks one of these)."""

    EAGER = "eager"  # every row before step 1, in batched passes, cached
    LAZY = "lazy"  # a checked sample before step 1; the trainer's rows prepared on demand as it draws them
    PACKED_SHARE = "packed share"  # a bounded packed run: rows drawn at random, prepared in cached chunks
    STREAMED = "streamed"  # rows read from a stream, a window at a time, each prepared when the trainer draws it

    def __str__(self) -> str:
        return self.value


@dataclass
class AdapterChoice:
    source_name: str
    installed: InstalledAdapter
    reason: str
    options: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        adapter = self.installed
        return {"source": self.source_name, "name": adapter.adapter.name, "distribution": adapter.distribution,
                "version": adapter.version, "chosen": self.reason, "options": options_record(self.options)}


@dataclass
class PreparedSplit:
    """The prepared rows of a split (all of them, or the lazy run's sample), valid or not, and how they fared."""

    name: str
    rows: datasets.Dataset
    report: RowReport
    on_demand: datasets.Dataset | None = None  # a lazy run's trainer rows, each prepared when it is drawn
    share: bool = False  # the rows are a bounded packed run's share: a prefix of the training order, not every row

    def invalid_row_ids(self) -> set[int]:
        """Global ids of the rows already found invalid, so a lazy run does not report them twice."""
        return {row for row, reason in zip(self.rows["row"], self.rows["invalid"], strict=True) if reason is not None}

    def trainable(self) -> datasets.Dataset:
        """The valid rows' input_ids and labels (eval reads them as they are)."""
        return valid_rows(self.rows).select_columns(["input_ids", "labels"])


def valid_rows(rows: datasets.Dataset) -> datasets.Dataset:
    """The valid rows: an index mapping, no pass over the data (a cached epoch starts at once)."""
    invalid = rows.with_format("arrow")["invalid"]  # through the index mapping of a selection, if any
    valid = np.flatnonzero(pc.is_null(invalid).to_numpy(zero_copy_only=False))
    return rows if len(valid) == len(rows) else rows.select(valid)


@dataclass
class PreparedData:
    train: PreparedSplit
    eval: PreparedSplit | None
    adapters: list[AdapterChoice]
    sources: list[Source]
    eval_origin: str
    mode: Preparation
    why: str  # why this mode
    rendered: int  # conversations the render guard rendered in this run
    from_cache: bool  # prepared rows came from the cache, whose rows were rendered and checked when prepared
    chains: list[RowChain]  # each source's row chain
    draws: list[Draw] | None = None  # what a mixture with fractions drew from each source
    accounts: list[SourceAccount] = field(default_factory=list)  # each source's part of each split

    @property
    def preparation(self) -> str:
        return f"{self.mode.value} ({self.why})"

    def record(self, split: PreparedSplit, position: int) -> dict[str, Any]:
        """The canonical record of a prepared row, made again from its raw row by its source's chain."""
        entry = split.rows[position]
        source = self.sources[entry["source_index"]]
        return self.chains[entry["source_index"]].record(getattr(source, entry["source_split"])[entry["source_row"]])

    def describe(self) -> dict[str, Any]:
        """What the run record says about the data."""
        splits = [split for split in (self.train, self.eval) if split is not None]
        return {
            "adapter": self.adapters[0].describe() if len(self.adapters) == 1 else [a.describe() for a in self.adapters],
            "data": {
                "preparation": self.preparation,
                **{f"{split.name}_rows": len(split.on_demand) if split.on_demand else split.report.valid
                   for split in splits},
                "invalid_rows": {split.name: dict(split.report.invalid) for split in splits},
                "noted": {split.name: dict(split.report.noted) for split in splits},
                "eval": self.eval_origin,
                "render_guard_rows": self.rendered,
                "from_cache": self.from_cache,
                "sources": [account.record() for account in self.accounts],
            },
        }

    def write_skipped(self, output_dir: str, resuming: bool) -> int:
        """List every row found invalid before step 1, its reason and its raw content (``bad_rows.write_skipped``)."""
        return write_skipped([split for split in (self.train, self.eval) if split is not None], self.sources,
                             output_dir, resuming)


# ---------------------------------------------------------------- which rows, which adapter, which way


def _choose_adapters(sources: list[Source]) -> list[AdapterChoice]:
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


def _first_record(sources: list[Source], chains: list[RowChain]) -> dict[str, Any] | None:
    """The first of a few rows of the first source that its adapter converts: what kind of records the run has."""
    for position in range(min(16, sources[0].train.num_rows)):
        try:
            return chains[0].record(sources[0].train[position])
        except RowError:
            continue
    return None


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


def preparation_mode(recipe: Recipe, train_rows: int) -> tuple[Preparation, str]:
    """Lazy when a bounded run reads less than the dataset, a packed share when it packs, else eager; and why."""
    asked, args = recipe.sftkit.prepare, recipe.training
    if asked != "auto":
        if asked == Preparation.LAZY and args.packing:
            raise SftkitError("prepare: lazy cannot pack (packing needs each row's length before step 1); use "
                              "prepare: auto (a bounded run prepares only the rows it packs) or eager")
        return Preparation(asked), "as the recipe says"
    if args.max_steps <= 0:
        return Preparation.EAGER, "the run reads every row (num_train_epochs)"
    needed = _rows_per_run(recipe)
    if args.packing:
        return Preparation.PACKED_SHARE, (
            f"max_steps packs {needed:,} sequences of up to {args.max_length} tokens: rows drawn at random from "
            f"{train_rows:,} and prepared before step 1, until they fill them")
    if needed >= train_rows:
        return Preparation.EAGER, f"max_steps reads {needed:,} rows, the whole dataset"
    return Preparation.LAZY, f"max_steps reads {needed:,} of {train_rows:,} rows"


def _rows_per_run(recipe: Recipe) -> int:
    """Rows (packed sequences, when packing) the trainer draws over max_steps, all processes together."""
    args = recipe.training
    return args.max_steps * args.gradient_accumulation_steps * args.per_device_train_batch_size * number_of_processes()


# ---------------------------------------------------------------- preparing rows through the chain


def _parts(sources: list[Source], split: str, ids: np.ndarray | None) -> list[tuple[int, datasets.Dataset, np.ndarray]]:
    """Each source's raw rows of ``split`` (only global train row ``ids``, if given): (source, rows, their rows)."""
    offsets = np.cumsum([0] + [source.train.num_rows for source in sources])
    parts = []
    for index, source in enumerate(sources):
        raw = getattr(source, split)
        if raw is None:
            continue
        rows = np.arange(raw.num_rows)
        if ids is not None:
            rows = ids[(ids >= offsets[index]) & (ids < offsets[index + 1])] - offsets[index]
            raw = raw.select(rows)
        parts.append((index, raw, rows))
    return parts


def _guard(parts: list[tuple[int, datasets.Dataset, np.ndarray]], sources: list[Source], chains: list[RowChain],
           count: int, split: str, source_split: str) -> int:
    """The render guard on ``count`` rows spread over the split (rows of each source's ``source_split``), before any
    row is prepared; returns rows rendered."""
    total = sum(len(rows) for _, _, rows in parts)
    picked, records, start = set(sample_indices(total, count)), [], 0
    for index, raw, rows in parts:
        source = sources[index]
        for position in sorted(p - start for p in picked if start <= p < start + len(rows)):
            name = row_name(source.name, source.loaded_row(source_split, int(rows[position])))
            try:
                records.append((name, chains[index].record(raw[position])))
            except RowError:
                continue  # counted by the bad-row policy when the row is prepared
        start += len(rows)
    if not records:
        return 0
    chain = chains[parts[0][0]]
    return check_rendering(records, chain.tokenizer, chain.settings, split)


def _prepared(parts: list[tuple[int, datasets.Dataset, np.ndarray]], sources: list[Source], chains: list[RowChain],
              split: str, name: str, key: str, num_proc: int | None) -> datasets.Dataset:
    """Every planned row through its source's chain, tagged with where it came from."""
    offsets = np.cumsum([0] + [source.train.num_rows for source in sources])
    prepared = []
    for index, raw, rows in parts:
        out = prepare_rows(raw, chains[index], name, f"{key}-{name}-{index}", num_proc)
        out = out.add_column("source_index", [index] * out.num_rows)
        out = out.add_column("source_split", [split] * out.num_rows)
        out = out.add_column("source_row", rows.tolist())
        prepared.append(out.add_column("row", (rows + offsets[index]).tolist()))  # the id lazy runs draw by
    return datasets.concatenate_datasets(prepared)


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Everything of the tokenizer that changes a row's tokens: vocabulary, special tokens, template, whether
    plain text gets a BOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    probe = tokenizer("sftkit", add_special_tokens=True)["input_ids"]
    return hashlib.sha256(f"{text}|{specials}|{probe}|{tokenizer.chat_template}".encode()).hexdigest()


Plan = dict[str, tuple[str, np.ndarray | None]]  # prepared split -> (source split, global train row ids)


def _prepare_planned(sources: list[Source], chains: list[RowChain], choices: list[AdapterChoice], plan: Plan,
                     num_proc: int | None, guard_rows: int) -> tuple[dict[str, datasets.Dataset], int, bool]:
    """The planned rows through the row chain in batched, parallel passes, through the cache; the render guard on
    a sample first.

    Returns the prepared splits, how many conversations the render guard rendered, and whether the splits came
    from the cache (then it rendered none: they were rendered and passed before being saved, and the key covers
    the template).
    """
    key = preparation_key(
        {
            "sources": [source.fingerprint for source in sources],
            "adapters": [(c.installed.adapter.name, c.installed.distribution, c.installed.version,
                          options_record(c.options)) for c in choices],
            "tokenizer": _tokenizer_fingerprint(chains[0].tokenizer),
            "settings": asdict(chains[0].settings),
            "plan": {name: (split, None if ids is None else hashlib.sha256(ids.tobytes()).hexdigest())
                     for name, (split, ids) in plan.items()},
        },
        code=code_digest(type(choice.installed.adapter) for choice in choices),
    )

    rendered = 0

    def build() -> dict[str, datasets.Dataset]:
        nonlocal rendered
        splits = {}
        for name, (split, ids) in plan.items():
            parts = _parts(sources, split, ids)
            rendered += _guard(parts, sources, chains, guard_rows, name, split)
            splits[name] = _prepared(parts, sources, chains, split, name, key, num_proc)
        return splits

    splits, from_cache = cached(key, build)
    return splits, rendered, from_cache


def _prepare_on_demand(sources: list[Source], chains: list[RowChain], choices: list[AdapterChoice],
                       train_ids: np.ndarray, guard_rows: int,
                       seed: int) -> tuple[datasets.Dataset, datasets.Dataset, int]:
    """The trainer's rows in training order, each prepared when drawn; a prepared sample spread over them to check
    before step 1; and how many conversations of it the render guard rendered."""
    on_demand_sources = []
    for source, chain in zip(sources, chains, strict=True):
        columns = [column for column in chain.read if column in source.train.column_names]
        on_demand_sources.append(OnDemandSource(source.train.select_columns(columns), chain, source.name,
                                                source.drawn.get("train")))
    sample = train_ids[sample_indices(len(train_ids), PREFLIGHT_ROWS)]
    parts = _parts(sources, "train", sample)
    rendered = _guard(parts, sources, chains, guard_rows, "train", "train")
    key = preparation_key({"sources": [source.fingerprint for source in sources], "sample": sample.tolist()},
                          code=code_digest(type(choice.installed.adapter) for choice in choices))
    preflight = _prepared(parts, sources, chains, "train", "train sample", key, None)
    return preflight, on_demand_rows(on_demand_sources, training_order(train_ids, seed)), rendered


def _prepare_packed_share(recipe: Recipe, sources: list[Source], chains: list[RowChain],
                          choices: list[AdapterChoice], train_ids: np.ndarray, num_proc: int | None,
                          guard_rows: int) -> tuple[dict[str, datasets.Dataset], int, bool, bool]:
    """A bounded packed run's rows: a prefix of the training order, prepared in chunks that double (each cached,
    the same chunks whatever max_steps is) until their whole packing windows fill the sequences max_steps trains
    on, or the data runs out. The render guard samples the first chunk. Returns the rows, the conversations the
    guard rendered, whether the first chunk came from the cache, and whether the rows are only a share."""
    args, needed = recipe.training, _rows_per_run(recipe)
    order = training_order(train_ids, order_seed(args))
    chunks, rendered, from_cache, taken, size = [], 0, False, 0, PACKING_WINDOW
    while True:
        ids = np.sort(order[taken:taken + size])
        prepared, chunk_rendered, chunk_from_cache = _prepare_planned(
            sources, chains, choices, {"train": ("train", ids)}, num_proc, guard_rows if not chunks else 0)
        if not chunks:
            rendered, from_cache = chunk_rendered, chunk_from_cache
        chunks.append(prepared["train"])
        taken, size = taken + len(ids), size * 2
        rows = datasets.concatenate_datasets(chunks)
        share = taken < len(order)
        packs = pack_in_order(valid_rows(in_training_order(rows, order_seed(args))), args.max_length, args.packing_strategy,
                              whole_windows_only=share)
        if len(packs) >= needed or not share:
            logger.info("packed share: %s rows prepared fill %s sequences (%s needed)", f"{taken:,}",
                        f"{len(packs):,}", f"{needed:,}")
            return {"train": rows}, rendered, from_cache, share


def _prepare_streamed(recipe: Recipe, sources: list[Source], choices: list[AdapterChoice], chains: list[RowChain],
                      enforce_policy: bool) -> PreparedData:
    """A streamed run (``sftkit.data.streaming``): the trainer's rows read and prepared as it draws them; before
    step 1, the run's first rows prepared to check and report, and the held-out rows (each source's first
    ``test_split_size`` rows, or a dataset's own test split)."""
    held_out, streams = int(recipe.mixture.test_split_size or 0), []
    for source, chain in zip(sources, chains, strict=True):
        skip = held_out if source.eval is None else 0  # a dataset's own test split, or its first rows
        if skip:
            source.eval = datasets.Dataset.from_list(list(itertools.islice(iter(source.stream), skip)))
        streams.append(streaming.Stream(source.stream, source.name, chain, skip))
    fractions = [source.fraction for source in sources]
    counts = streaming.window_counts(streaming.stream_probabilities(streams, fractions))
    reader = streaming.StreamReader(streams, counts, recipe.sftkit.mixture, order_seed(recipe.training))
    count = _rows_per_run(recipe)
    guard_rows, rendered, parts = recipe.sftkit.render_check_rows, 0, []
    picked = [(position, *reader[position]) for position in range(min(PREFLIGHT_ROWS, count))]
    for index, source in enumerate(sources):  # the run's first rows, as a sample of each source
        mine = [(position, line, raw) for position, source_index, line, raw in picked if source_index == index]
        if mine:
            source.train = datasets.Dataset.from_list([raw for _, _, raw in mine])
            source.drawn["train"] = np.array([line for _, line, _ in mine])
            parts.append((index, source.train, np.array([position for position, _, _ in mine])))
    rendered += _guard([(index, raw, np.arange(len(raw))) for index, raw, _ in parts], sources, chains, guard_rows,
                       "train", "train")
    sample = []
    for index, raw, positions in parts:
        out = prepare_rows(raw, chains[index], "train sample", f"stream-sample-{index}-{raw._fingerprint}")
        for name, values in (("source_index", [index] * len(positions)), ("source_split", ["train"] * len(positions)),
                             ("source_row", list(range(len(positions)))), ("row", positions.tolist())):
            out = out.add_column(name, values)
        sample.append(out)
    splits = {"train": datasets.concatenate_datasets(sample)}
    eval_parts = [(index, source.eval, np.arange(source.eval.num_rows)) for index, source in enumerate(sources)
                  if source.eval is not None]
    if eval_parts:
        rendered += _guard(eval_parts, sources, chains, guard_rows, "eval", "eval")
        splits["eval"] = _prepared(eval_parts, sources, chains, "eval", "eval", "stream-eval", None)
    origin = ("none" if not eval_parts else f"each source's first {held_out} rows (test_split_size)" if held_out
              else f"split {recipe.script.dataset_test_split!r}")
    if rendered:
        logger.info("render guard: every turn of %d sampled conversations appears in the chat template's rendering",
                    rendered)
    on_demand = streaming.streamed_rows(reader, count)
    prepared: dict[str, PreparedSplit] = {}
    for name, rows in splits.items():
        report = report_rows(rows, "train sample" if name == "train" else name, sources)
        if enforce_policy:
            enforce(report, recipe.sftkit.on_invalid, recipe.sftkit.max_invalid_fraction)
        prepared[name] = PreparedSplit(name, rows, report, on_demand if name == "train" else None)
    asked = (np.asarray(fractions) / sum(fractions)).tolist() if None not in fractions else None
    accounts = [account for split in prepared.values() for account in account_split(
        split, [source.name for source in sources], asked if split.name == "train" else None,
        recipe.training.max_length, sample=split.name == "train")]
    why = f"max_steps reads {count:,} rows from the stream, {streaming.WINDOW:,} rows shuffled at a time"
    logger.info("preparation: %s (%s)", Preparation.STREAMED.value, why)
    return PreparedData(prepared["train"], prepared.get("eval"), choices, sources, origin, Preparation.STREAMED, why,
                        rendered, False, chains, None, accounts)


def prepare_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, enforce_policy: bool = True) -> PreparedData:
    """Load every source, take its rows through the row chain, apply the bad-row policy; the render guard first.

    ``tokenizer`` is the run's, settled (chat template, special tokens) before any row is prepared.
    """
    sources = load_sources(recipe)
    choices = _choose_adapters(sources)
    tokenizer, note = rendering_tokenizer(tokenizer)
    for line in (note, reply_end(tokenizer)[2]):
        if line:
            logger.info(line)
    settings = TokenizeSettings.from_recipe(recipe, tokenizer)
    chains = [RowChain(choice.installed.adapter, choice.options, tokenizer, settings) for choice in choices]
    require_chat_template(tokenizer, _first_record(sources, chains), recipe.model.model_name_or_path)
    if streaming.is_streaming(recipe):
        return _prepare_streamed(recipe, sources, choices, chains, enforce_policy)
    draws = None
    if any(source.fraction is not None for source in sources):
        draws = draw_mixture(sources, chains, [source.fraction for source in sources], recipe.sftkit.mixture,
                             recipe.mixture.test_split_size, order_seed(recipe.training))
        for source, drawn in zip(sources, draws, strict=True):
            logger.info("mixture: %s", drawn.describe(source.name))
    total = sum(source.train.num_rows for source in sources)
    has_own_eval = any(source.eval is not None for source in sources)
    if draws is not None:
        train_ids, eval_ids = np.arange(total), None
        origin = (f"{sum(drawn.held_out for drawn in draws)} rows held out of the sources, each its part "
                  f"(test_split_size {recipe.mixture.test_split_size}, seed {order_seed(recipe.training)})"
                  if has_own_eval else "none")
    elif has_own_eval:
        train_ids, eval_ids, origin = np.arange(total), None, f"split {recipe.script.dataset_test_split!r}"
    else:
        train_ids, eval_ids, origin = split_held_out(total, recipe)
    num_proc = recipe.training.dataset_num_proc or (usable_cpus() if total >= PARALLEL_FROM_ROWS else None)
    mode, why = preparation_mode(recipe, len(train_ids))
    logger.info("preparation: %s (%s)", mode.value, why)

    eval_plan: Plan = {"eval": ("train", eval_ids)} if eval_ids is not None else (
        {"eval": ("eval", None)} if has_own_eval else {})
    on_demand, share, guard_rows = None, False, recipe.sftkit.render_check_rows
    if mode == Preparation.LAZY:
        sample, on_demand, rendered = _prepare_on_demand(sources, chains, choices, train_ids, guard_rows,
                                                         order_seed(recipe.training))
        prepared, from_cache = {"train": sample}, False
    elif mode == Preparation.PACKED_SHARE:
        prepared, rendered, from_cache, share = _prepare_packed_share(recipe, sources, chains, choices, train_ids,
                                                                      num_proc, guard_rows)
    else:
        plan: Plan = {"train": ("train", train_ids if eval_ids is not None else None), **eval_plan}
        prepared, rendered, from_cache = _prepare_planned(sources, chains, choices, plan, num_proc, guard_rows)
        eval_plan = {}  # prepared with the train rows
    if eval_plan:
        evaluation, eval_rendered, eval_from_cache = _prepare_planned(sources, chains, choices, eval_plan, num_proc,
                                                                      guard_rows)
        prepared.update(evaluation)
        rendered, from_cache = rendered + eval_rendered, from_cache or eval_from_cache
    if from_cache:
        logger.info("prepared rows loaded from the cache (their rendering was checked when they were prepared)")
    if rendered:
        logger.info("render guard: every turn of %d sampled conversations appears in the chat template's rendering",
                    rendered)
    elif not guard_rows:
        logger.info("render guard: off (render_check_rows: 0); every row is still checked as it is prepared")

    splits: dict[str, PreparedSplit] = {}
    for name, rows in prepared.items():
        sample = name == "train" and on_demand is not None
        report = report_rows(rows, "train sample" if sample else name, sources)
        if enforce_policy:
            enforce(report, recipe.sftkit.on_invalid, recipe.sftkit.max_invalid_fraction)
        splits[name] = PreparedSplit(name, rows, report, on_demand if sample else None, share and name == "train")
    asked = [drawn.asked for drawn in draws] if draws else None
    names = [source.name for source in sources]
    accounts = [account for split in splits.values() for account in account_split(
        split, names, asked if split.name == "train" else None, recipe.training.max_length,
        sample=split.on_demand is not None)]
    check_shares([account for account in accounts if account.split == "train"])
    return PreparedData(splits["train"], splits.get("eval"), choices, sources, origin, mode, why, rendered,
                        from_cache, chains, draws, accounts)
