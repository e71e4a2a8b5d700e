"""The training order is a function of the seed, the epoch and the row ids: whichever way the rows are prepared,
however many a run prepares, the same rows come next."""

from __future__ import annotations

import numpy as np
from helpers import TINY_MODEL, sharegpt_row, write_jsonl, write_recipe

from sftkit.data.order import PACKING_WINDOW, EpochOrder, training_order
from sftkit.data.preparation import prepare_data
from sftkit.jobs.train import trainer_rows
from sftkit.setup.resolve import load_recipe
from sftkit.train.model import load_tokenizer


def test_a_row_keeps_its_place_among_any_other_rows():
    everything = training_order(np.arange(10_000), seed=7)
    some = np.random.default_rng(0).choice(10_000, 3_000, replace=False)
    assert list(training_order(some, seed=7)) == [row for row in everything if row in set(some)]
    assert list(training_order(np.arange(10_000), seed=8)) != list(everything)


def test_each_epoch_has_its_own_order_and_the_first_reads_the_layout():
    order = EpochOrder(np.arange(100, 200), seed=3)
    assert list(order) == list(range(100))
    order.set_epoch(1)
    second = list(order)
    order.set_epoch(2)
    assert sorted(second) == list(range(100)) and second != list(range(100)) and list(order) != second
    order.set_epoch(1)
    assert list(order) == second


def _prepare(tmp_path, data, **keys):
    values = {"model_name_or_path": TINY_MODEL, "dataset_name": str(data), "output_dir": str(tmp_path / "out"),
              "max_length": 128, "test_split_size": 0, "per_device_train_batch_size": 4, **keys}
    recipe = load_recipe(str(write_recipe(tmp_path / "recipe.yaml", **values)))
    return trainer_rows(prepare_data(recipe, load_tokenizer(recipe)), recipe.training)


def _items(rows) -> list[tuple]:
    return [(item["row"], tuple(item["input_ids"]) if len(item["input_ids"]) else "invalid") for item in rows]


def test_eager_and_lazy_runs_train_the_same_batches_invalid_rows_keeping_their_place(tmp_path):
    rows = [sharegpt_row(index, ("human", f"What is {index} + 1?"), ("gpt", f"{index + 1}.")) for index in range(300)]
    for index in (5, 77, 160):
        rows[index] = sharegpt_row(index, ("human", "no answer"))
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    eager = _prepare(tmp_path, data, prepare="eager", on_invalid="skip", max_invalid_fraction=0.1)
    lazy = _prepare(tmp_path, data, prepare="lazy", max_steps=2, on_invalid="skip", max_invalid_fraction=0.1)
    assert _items(eager.train) == _items(lazy.train) and list(eager.keys) == list(lazy.keys)
    assert [item for item in _items(eager.train) if item[1] == "invalid"] != []


def test_a_longer_packed_run_adds_packs_after_a_shorter_ones(tmp_path):
    rows = [sharegpt_row(index, ("human", "word " * (index % 40 + 1)), ("gpt", "ok " * (index % 7 + 1)))
            for index in range(3 * PACKING_WINDOW)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    short = _prepare(tmp_path, data, packing=True, max_steps=10)
    longer = _prepare(tmp_path, data, packing=True, max_steps=400)
    assert 40 <= len(short.train) < len(longer.train)
    assert short.train["rows"] == longer.train["rows"][:len(short.train)]
    assert short.train["input_ids"] == longer.train["input_ids"][:len(short.train)]
