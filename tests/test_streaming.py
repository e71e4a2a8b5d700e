"""Streaming: a mixture read from local files as streams, at its shares of the trained tokens, each row at a position
fixed by the seed and the files alone, through the same row chain and bad-row policy. (The kill test that resumes
a streamed mixture is in test_resume.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT, TINY_MODEL, write_recipe
from test_mixture import SHARES, three_sources

from sftkit.data.preparation import prepare_data
from sftkit.data.streaming import WINDOW
from sftkit.errors import SftkitError
from sftkit.setup.resolve import load_recipe
from sftkit.train.model import load_tokenizer


def streamed_recipe(folder, **values):
    """The three sources of test_mixture, unsorted: a stream is shuffled a window at a time, so a file sorted by
    length streams its short rows first, and its token share is measured on those."""
    sources = three_sources(folder, sorted_by_length=False)
    entries = [{"path": str(path), "fraction": share} for path, share in zip(sources, SHARES, strict=True)]
    settings = {"model_name_or_path": TINY_MODEL, "output_dir": str(folder / "out"), "report_to": "none",
                "assistant_only_loss": True, "max_length": 128, "datasets": entries, "streaming": True,
                "mixture": "over", "test_split_size": 10, "max_steps": 400, "per_device_train_batch_size": 4,
                **values}
    return load_recipe(str(write_recipe(folder / "streamed.yaml", **settings)))


def reader_of(data):
    return data.train.on_demand.format["format_kwargs"]["transform"].rows


def test_a_streamed_mixture_trains_its_token_shares(tmp_path):
    recipe = streamed_recipe(tmp_path)
    data = prepare_data(recipe, load_tokenizer(recipe))
    assert str(data.mode) == "streamed" and len(data.train.on_demand) == 1600  # max_steps x 4 rows
    trained = [0, 0, 0]
    for rows in (data.train.on_demand[start:start + 400] for start in range(0, 1600, 400)):
        for position, labels in zip(rows["row"], rows["labels"], strict=True):
            trained[reader_of(data)[position][0]] += sum(label != -100 for label in labels)
    shares = [count / sum(trained) for count in trained]
    assert shares == pytest.approx(SHARES, abs=0.02), shares


def test_each_position_is_fixed_by_the_seed_and_held_out_rows_never_train(tmp_path):
    recipe = streamed_recipe(tmp_path)
    data = prepare_data(recipe, load_tokenizer(recipe))
    reader = reader_of(data)
    first = [reader[position][:2] for position in (0, 1, WINDOW + 5, 17)]  # forward, then back: read again
    assert [reader[position][:2] for position in (0, 1, WINDOW + 5, 17)] == first
    again = reader_of(prepare_data(recipe, load_tokenizer(recipe)))
    assert [again[position][:2] for position in (17, WINDOW + 5)] == [first[3], first[2]]  # a fresh reader agrees
    lines = {(index, line) for index, line, _ in (reader[position] for position in range(3 * WINDOW))}
    assert not any(line < 10 for _, line in lines)  # each source's first 10 rows are held out
    assert data.eval.report.rows == 30
    reseeded = streamed_recipe(tmp_path, seed=7)
    other = reader_of(prepare_data(reseeded, load_tokenizer(reseeded)))
    assert [other[position][:2] for position in range(8)] != [reader[position][:2] for position in range(8)]


def test_streaming_says_what_it_needs(tmp_path):
    for values, says in (({"max_steps": -1, "num_train_epochs": 1}, "streaming needs max_steps"),
                         ({"packing": True}, "packing needs each row's length before step 1"),
                         ({"test_split_size": 0.1}, "a stream has no length to take a fraction of")):
        with pytest.raises(SftkitError, match=says):
            streamed_recipe(tmp_path, **values)


@pytest.mark.slow
def test_a_streamed_run_trains_skips_bad_rows_and_lists_them(tmp_path):
    sources = three_sources(tmp_path)
    lines = sources[1].read_text().splitlines()
    for line in range(20, 400, 3):  # rows with nothing to train, met mid-run
        lines[line] = json.dumps({"instruction": "", "input": "", "output": ""})
    sources[1].write_text("\n".join(lines) + "\n")
    recipe = write_recipe(
        tmp_path / "r.yaml", model_name_or_path=TINY_MODEL, output_dir=str(tmp_path / "out"), report_to="none",
        datasets=[{"path": str(sources[1])}], streaming=True, max_steps=25, per_device_train_batch_size=4,
        on_invalid="skip", max_invalid_fraction=0.5, save_strategy="no", eval_strategy="no", logging_steps=25)
    result = subprocess.run([sys.executable, "-m", "sftkit", "--config", str(recipe)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "preparation: streamed" in result.stderr
    listed = [json.loads(line) for line in (tmp_path / "out" / "skipped_rows.jsonl").read_text().splitlines()]
    assert listed and all(entry["source_row"] in range(20, 400, 3) for entry in listed)
    assert all(entry["data"]["output"] == "" for entry in listed)
