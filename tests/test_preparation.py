"""Preparation: eager (cached by everything that changes it) or lazy (only what a bounded run reads)."""

from __future__ import annotations

import logging

import pytest
from helpers import TINY_MODEL, sharegpt_row, write_jsonl, write_recipe

from sftkit.data.preparation import prepare_data
from sftkit.jobs.train import trainer_rows
from sftkit.setup.resolve import load_recipe
from sftkit.train.model import load_tokenizer


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
    assert prepared.preparation.startswith("lazy (max_steps reads 20 of 3,000 rows)")
    assert prepared.train.rows.num_rows == 256  # the pre-flight sample, not the dataset
    assert prepared.train.report.split == "train sample"
    assert not cache.exists() or entries(cache) == 0  # nothing eager was prepared
    lazy = prepared.train.on_demand
    assert len(lazy) == 3000
    item = lazy[2999]  # the last in training order
    assert item["input_ids"] and item["sftkit_invalid"] is None
    assert item["input_ids"] == prepare(tmp_path, data, prepare="eager").train.rows[item["row"]]["input_ids"]


def test_epoch_runs_prepare_eagerly(tmp_path, cache, sharegpt_rows):
    data = write_jsonl(tmp_path / "rows.jsonl", sharegpt_rows)
    assert prepare(tmp_path, data).preparation.startswith("eager (the run reads every row")
    assert prepare(tmp_path, data, max_steps=1000).preparation.startswith("eager (max_steps reads")
    assert prepare(tmp_path, data, packing=True).preparation.startswith("eager (the run reads every row")


def test_bounded_packed_run_prepares_only_the_rows_it_packs(tmp_path, cache):
    rows = [sharegpt_row(index, ("human", f"What is {index} + 1?"), ("gpt", f"{index + 1}.")) for index in range(3000)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    keys = {"max_steps": 3, "per_device_train_batch_size": 4, "packing": True, "max_length": 256}
    prepared = prepare(tmp_path, data, **keys)
    assert prepared.preparation.startswith("packed share (max_steps packs 12 sequences of up to 256 tokens")
    taken = prepared.train.rows["row"]
    assert 12 < len(taken) < 3000 and len(set(taken)) == len(taken)  # a share of the rows, none twice
    assert max(taken) > 1500  # drawn from the whole dataset, not its head
    recipe = load_recipe(str(tmp_path / "recipe.yaml"))
    assert len(trainer_rows(prepared, recipe.training).train) >= 12  # they fill what the run trains on
    again = prepare(tmp_path, data, **keys)
    assert again.from_cache and again.train.rows["row"] == taken  # from the cache: the same rows
    everything = prepare(tmp_path, data, **{**keys, "max_steps": 1000})
    assert everything.train.rows.num_rows == 3000  # more sequences than the data fills: all of it


def _plugin(folder, behaviour: str):
    """An adapter package on disk whose conversion calls a helper module: code a user upgrades or edits."""
    package = folder / "sftkit_test_upgraded"
    package.mkdir(exist_ok=True)
    (package / "helpers.py").write_text(f"def answer(text):\n    return {behaviour}\n")
    (package / "__init__.py").write_text(
        "from sftkit import Adapter, Columns, hookimpl\n"
        "from sftkit_test_upgraded.helpers import answer\n\n\n"
        "class Upgraded(Adapter):\n"
        "    name = 'upgraded'\n\n"
        "    def columns(self, options):\n        return Columns(required=('q', 'a'))\n\n"
        "    def convert(self, row, options):\n"
        "        return {'messages': [{'role': 'user', 'content': row['q']},"
        " {'role': 'assistant', 'content': answer(row['a'])}]}\n\n\n"
        "@hookimpl\ndef register_adapters(register):\n    register(Upgraded())\n")


def test_a_change_in_an_adapters_code_reaches_the_data(tmp_path, cache, monkeypatch):
    """Edit a helper the adapter imports (not the adapter's own module): the next run prepares the rows again with
    the new code instead of handing back the old rows under a new key or the old one."""
    import importlib
    import sys

    import pluggy

    from sftkit import hookspecs, plugins

    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "rows.jsonl", [{"q": f"Q{i}?", "a": f"A{i}."} for i in range(20)])

    def run(behaviour: str) -> list[str]:
        _plugin(tmp_path, behaviour)
        for name in ("sftkit_test_upgraded.helpers", "sftkit_test_upgraded"):
            sys.modules.pop(name, None)
        importlib.invalidate_caches()
        manager = pluggy.PluginManager("sftkit")
        manager.add_hookspecs(hookspecs)
        manager.register(importlib.import_module("sftkit_test_upgraded"), name="sftkit-test-upgraded:plugin")
        monkeypatch.setattr(plugins, "registry", lambda: plugins.collect_adapters(manager, {}))
        prepared = prepare(tmp_path, data, prepare="eager", dataset_format="upgraded", assistant_only_loss=True)
        tokenizer = load_tokenizer(load_recipe(str(tmp_path / "recipe.yaml")))
        return [tokenizer.decode(ids) for ids in prepared.train.rows["input_ids"]]

    assert "A0." in run("text")[0]
    assert "A0. (upgraded)" in run("text + ' (upgraded)'")[0]


def test_changed_content_with_the_same_modification_time_is_new_data(tmp_path, cache):
    """cp -p, rsync -t and tar keep a file's modification time: the content decides, not the time."""
    import os

    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"text": f"Amberhold {index}."} for index in range(20)])
    stamp = path.stat()
    first = prepare(tmp_path, path, prepare="eager")
    write_jsonl(path, [{"text": f"Marrowind {index}."} for index in range(20)])  # same size, other words
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_size == stamp.st_size and path.stat().st_mtime_ns == stamp.st_mtime_ns
    second = prepare(tmp_path, path, prepare="eager")
    assert second.train.rows["input_ids"] != first.train.rows["input_ids"]


def test_eval_rows_are_cut_to_max_length_and_packed_like_train_rows(tmp_path, cache):
    rows = [sharegpt_row(index, ("human", "word " * (5 + index)), ("gpt", "ok " * (5 + index))) for index in range(40)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    recipe_keys = {"max_length": 48, "test_split_size": 0.25, "prepare": "eager"}
    prepared = prepare(tmp_path, data, **recipe_keys)
    recipe = load_recipe(str(tmp_path / "recipe.yaml"))
    unpacked = trainer_rows(prepared, recipe.training).eval
    assert max(len(ids) for ids in unpacked["input_ids"]) == 48  # cut, as the train rows are
    prepared = prepare(tmp_path, data, packing=True, **{**recipe_keys, "max_length": 256})
    recipe = load_recipe(str(tmp_path / "recipe.yaml"))
    packed = trainer_rows(prepared, recipe.training).eval
    assert "seq_lengths" in packed.column_names and len(packed) < prepared.eval.report.valid
    assert max(len(ids) for ids in packed["input_ids"]) <= 256




def test_an_upgrade_of_what_renders_or_tokenizes_rows_is_a_new_key(tmp_path, cache, sharegpt_rows, monkeypatch):
    """jinja2, transformers' chat-template code and tokenizers each change what a row renders or tokenizes to."""
    from sftkit.data import cache as preparation_cache

    data = write_jsonl(tmp_path / "rows.jsonl", sharegpt_rows)
    prepare(tmp_path, data, prepare="eager")
    versions = preparation_cache.library_versions()
    assert set(versions) == {"transformers", "tokenizers", "jinja2"}
    for library in versions:
        upgraded = {**versions, library: versions[library] + ".post1"}
        monkeypatch.setattr(preparation_cache, "library_versions", lambda upgraded=upgraded: upgraded)
        prepare(tmp_path, data, prepare="eager")
    assert entries(cache) == 4
