"""Preparation: eager (cached by everything that changes it) or lazy (only what a bounded run reads)."""

from __future__ import annotations

import logging

import pytest
from helpers import TINY_MODEL, sharegpt_row, write_jsonl, write_recipe
from trl import pack_dataset

from sftkit.data import prepare_data
from sftkit.model import load_tokenizer
from sftkit.recipe import load_recipe


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("SFTKIT_CACHE", str(folder))
    return folder / "prepared"


def prepare(tmp_path, data, **keys):
    values = {"model_name_or_path": TINY_MODEL, "dataset_name": str(data), "output_dir": str(tmp_path / "out"),
              "report_to": "none", "max_length": 128, **keys}
    recipe = load_recipe(str(write_recipe(tmp_path / "recipe.yaml", **values)))
    return prepare_data(recipe, load_tokenizer(recipe))


def entries(cache) -> int:
    return len([path for path in cache.iterdir() if path.is_dir()])


def test_second_run_reads_the_cache_and_a_changed_key_never_does(tmp_path, cache, sharegpt_rows, caplog):
    data = write_jsonl(tmp_path / "rows.jsonl", sharegpt_rows)
    caplog.set_level(logging.INFO, logger="sftkit")
    first = prepare(tmp_path, data, prepare="eager")
    assert entries(cache) == 1 and "loaded from the cache" not in caplog.text
    second = prepare(tmp_path, data, prepare="eager", test_split_size=0.25)
    assert (second.train.name, second.train.report.rows, second.eval.report.rows) == ("train", 30, 10)
    second = prepare(tmp_path, data, prepare="eager", test_split_size=0.25)  # from the cache: the same splits
    assert (second.train.name, second.train.report.rows, second.eval.report.rows) == ("train", 30, 10)
    second = prepare(tmp_path, data, prepare="eager")
    assert "prepared rows loaded from the cache" in caplog.text and entries(cache) == 2
    assert second.train.rows["input_ids"] == first.train.rows["input_ids"]
    prepare(tmp_path, data, prepare="eager", max_length=64)  # tokens change: a new key
    prepare(tmp_path, data, prepare="eager", assistant_only_loss=True)  # labels change: a new key
    prepare(tmp_path, data, prepare="eager", dataset_options={"role_map": {"gpt": "assistant"}})  # adapter options
    assert entries(cache) == 5
    write_jsonl(tmp_path / "rows.jsonl", sharegpt_rows[:-1])  # the data changes
    changed = prepare(tmp_path, data, prepare="eager")
    assert entries(cache) == 6 and changed.train.report.rows == len(sharegpt_rows) - 1


def test_bounded_run_prepares_only_a_sample_before_step_one(tmp_path, cache):
    rows = [sharegpt_row(index, ("human", f"What is {index} + 1?"), ("gpt", f"{index + 1}.")) for index in range(3000)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    prepared = prepare(tmp_path, data, max_steps=5, per_device_train_batch_size=4)
    assert prepared.mode.startswith("lazy (max_steps reads 20 of 3,000 rows)")
    assert prepared.train.rows.num_rows == 256  # the pre-flight sample, not the dataset
    assert prepared.train.report.split == "train sample"
    assert not cache.exists() or entries(cache) == 0  # nothing eager was prepared
    lazy = prepared.train.trainable()
    assert len(lazy) == 3000
    item = lazy[2999]
    assert item["input_ids"] and item["sftkit_invalid"] is None
    assert item["input_ids"] == prepare(tmp_path, data, prepare="eager").train.rows[2999]["input_ids"]


def test_epoch_runs_prepare_eagerly(tmp_path, cache, sharegpt_rows):
    data = write_jsonl(tmp_path / "rows.jsonl", sharegpt_rows)
    assert prepare(tmp_path, data).mode.startswith("eager (the run reads every row")
    assert prepare(tmp_path, data, max_steps=1000).mode.startswith("eager (max_steps reads")
    assert prepare(tmp_path, data, packing=True).mode.startswith("eager (the run reads every row")


def test_bounded_packed_run_prepares_only_the_rows_it_packs(tmp_path, cache):
    rows = [sharegpt_row(index, ("human", f"What is {index} + 1?"), ("gpt", f"{index + 1}.")) for index in range(3000)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    keys = {"max_steps": 3, "per_device_train_batch_size": 4, "packing": True, "max_length": 256}
    prepared = prepare(tmp_path, data, **keys)
    assert prepared.mode.startswith("packed share (max_steps packs 12 sequences of up to 256 tokens")
    taken = prepared.train.rows["row"]
    assert 12 < len(taken) < 3000 and len(set(taken)) == len(taken)  # a share of the rows, none twice
    assert max(taken) > 1500  # drawn from the whole dataset, not its head
    assert len(pack_dataset(prepared.train.trainable(), 256, "bfd")) >= 12  # they fill what the run trains on
    again = prepare(tmp_path, data, **keys)
    assert again.rows_checked == -1 and again.train.rows["row"] == taken  # from the cache: the same rows
    everything = prepare(tmp_path, data, **{**keys, "max_steps": 1000})
    assert everything.train.rows.num_rows == 3000  # more sequences than the data fills: all of it
