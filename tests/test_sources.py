"""Sources: files by path or glob, directories, the dataset's own test split or a seeded held-out part."""

from __future__ import annotations

import json

import datasets
import pytest
from helpers import TINY_MODEL, write_jsonl, write_recipe

from sftkit.data.plan import split_held_out
from sftkit.data.sources import load_raw, load_sources
from sftkit.errors import SftkitError
from sftkit.setup.resolve import load_recipe


def test_json_jsonl_parquet_csv_and_globs(tmp_path, sharegpt_rows):
    write_jsonl(tmp_path / "a.jsonl", sharegpt_rows[:10])
    write_jsonl(tmp_path / "b.jsonl", sharegpt_rows[10:25])
    (tmp_path / "array.json").write_text(json.dumps(sharegpt_rows))
    datasets.Dataset.from_list(sharegpt_rows).to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "plain.csv").write_text("text\nhello\nworld\n")
    assert load_raw(str(tmp_path / "a.jsonl"), None)[0]["train"].num_rows == 10
    assert load_raw(str(tmp_path / "*.jsonl"), None)[0]["train"].num_rows == 25
    assert load_raw(str(tmp_path / "array.json"), None)[0]["train"].num_rows == 40
    assert load_raw(str(tmp_path / "rows.parquet"), None)[0]["train"].num_rows == 40
    assert load_raw(str(tmp_path / "plain.csv"), None)[0]["train"]["text"] == ["hello", "world"]


def test_directory_with_splits(tmp_path, sharegpt_rows):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", sharegpt_rows[:30])
    write_jsonl(folder / "test.jsonl", sharegpt_rows[30:])
    loaded, _ = load_raw(str(folder), None)
    assert (loaded["train"].num_rows, loaded["test"].num_rows) == (30, 10)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(SftkitError, match="no such file or directory"):
        load_raw(str(tmp_path / "missing.jsonl"), None)
    with pytest.raises(SftkitError, match="the glob matches no files"):
        load_raw(str(tmp_path / "*.jsonl"), None)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SftkitError, match="cannot read files with suffix .txt"):
        load_raw(str(tmp_path / "notes.txt"), None)


def recipe_for(tmp_path, data: str, **extra):
    path = write_recipe(
        tmp_path / "recipe.yaml", model_name_or_path=TINY_MODEL, dataset_name=data, output_dir=str(tmp_path), **extra
    )
    return load_recipe(str(path))


def test_own_test_split_is_preferred(tmp_path, sharegpt_rows):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", sharegpt_rows[:30])
    write_jsonl(folder / "test.jsonl", sharegpt_rows[30:])
    (source,) = load_sources(recipe_for(tmp_path, str(folder), test_split_size=0.5))
    assert (source.train.num_rows, source.eval.num_rows) == (30, 10)


def test_held_out_rows_are_deterministic_by_seed(tmp_path, sharegpt_rows):
    data = str(write_jsonl(tmp_path / "rows.jsonl", sharegpt_rows))
    first = split_held_out(40, recipe_for(tmp_path, data, test_split_size=0.25, seed=1))
    again = split_held_out(40, recipe_for(tmp_path, data, test_split_size=0.25, seed=1))
    other = split_held_out(40, recipe_for(tmp_path, data, test_split_size=0.25, seed=2))
    assert list(first[1]) == list(again[1]) != list(other[1])
    assert len(first[1]) == 10 and len(first[0]) == 30
    assert not set(first[1]) & set(first[0])
    assert len(split_held_out(40, recipe_for(tmp_path, data, test_split_size=4))[1]) == 4
    assert split_held_out(40, recipe_for(tmp_path, data))[1] is None


def test_missing_train_split_lists_the_splits(tmp_path, sharegpt_rows):
    data = str(write_jsonl(tmp_path / "rows.jsonl", sharegpt_rows))
    with pytest.raises(SftkitError, match="no split 'training'; it has train"):
        load_sources(recipe_for(tmp_path, data, dataset_train_split="training"))


def test_unreachable_hub_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does at import
    with pytest.raises(SftkitError, match="could not load it from the Hugging Face Hub"):
        load_raw("some-org/some-dataset-that-is-not-here", None)


def test_mixture_entries_have_their_own_format_and_options(tmp_path, sharegpt_rows):
    from sftkit.data.preparation import prepare_data
    from sftkit.train.model import load_tokenizer

    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"conversations": [{"speaker": "me", "text": f"q{index}"}, {"speaker": "bot", "text": f"a{index}"}]}
        for index in range(10)
    ])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": f"Say {index}.", "input": "", "output": str(index)} for index in range(20)
    ])
    recipe_path = write_recipe(
        tmp_path / "recipe.yaml", model_name_or_path=TINY_MODEL, output_dir=str(tmp_path / "out"), report_to="none",
        datasets=[
            {"path": str(chat), "dataset_format": "sharegpt",
             "dataset_options": {"role_key": "speaker", "content_key": "text", "role_map": {"me": "user", "bot": "assistant"}}},
            {"path": str(alpaca)},
        ],
    )
    recipe = load_recipe(str(recipe_path))
    data = prepare_data(recipe, load_tokenizer(recipe))
    assert [choice.installed.adapter.name for choice in data.plan.adapters] == ["sharegpt", "alpaca"]
    assert data.plan.adapters[1].reason.startswith("dataset_format auto: alpaca")
    assert data.train.report.valid == 30
    assert recipe.values["datasets"][0]["dataset_format"] == "sharegpt"  # the run record keeps them


def test_a_folder_without_data_files_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".notes").write_text("hidden, not data")
    with pytest.raises(SftkitError, match="the directory holds no data files"):
        load_raw(str(tmp_path / "empty"), None)


def rows_with_bytes_that_are_not_utf8(tmp_path, sharegpt_rows, array: bool):
    """Rows 3 and 17 hold bytes that are not UTF-8 text (a file saved in another encoding, a cut multi-byte
    character), the rest are well formed."""
    lines = [json.dumps(row, ensure_ascii=False).encode() for row in sharegpt_rows]
    for bad in (3, 17):
        lines[bad] = lines[bad].replace(b"What is", b"Qu\xe9 es")  # Latin-1, not UTF-8
    if array:
        path = tmp_path / "rows.json"
        path.write_bytes(b"[" + b",\n".join(lines) + b"]")
    else:
        path = tmp_path / "rows.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("array", [False, True], ids=["jsonl", "json array"])
@pytest.mark.parametrize("keys", [{"prepare": "eager"}, {"prepare": "lazy", "max_steps": 2},
                                  {"streaming": True, "max_steps": 5}], ids=["eager", "lazy", "streamed"])
def test_rows_that_are_not_utf8_are_invalid_rows_where_they_stand(tmp_path, sharegpt_rows, array, keys):
    from test_row_chain import by_row

    from sftkit.data.preparation import prepare_data
    from sftkit.train.model import load_tokenizer

    path = rows_with_bytes_that_are_not_utf8(tmp_path, sharegpt_rows, array)
    data_keys = {"dataset_streaming": True} if keys.get("streaming") else {}
    values = {"model_name_or_path": TINY_MODEL, "dataset_name": str(path), "output_dir": str(tmp_path / "out"),
              "test_split_size": 0, "on_invalid": "skip", "max_invalid_fraction": 0.5, "report_to": "none",
              **{key: value for key, value in keys.items() if key != "streaming"}, **data_keys}
    recipe = load_recipe(str(write_recipe(tmp_path / "recipe.yaml", **values)))
    data = prepare_data(recipe, load_tokenizer(recipe))
    if keys.get("streaming"):
        sample, lines = data.train.rows, data.train.parts[0].lines  # the run's first rows, and their lines
        reasons = {int(lines[row]): reason for row, reason in zip(sample["source_row"], sample["invalid"],
                                                                  strict=True)}
    else:
        reasons = {row: value for row, value in by_row(data).items()}
    unreadable = sorted(row for row, reason in reasons.items() if reason == "not UTF-8")
    assert unreadable == [row for row in (3, 17) if row in reasons] and unreadable  # a stream's first rows: some
    assert all(not isinstance(reason, str) for row, reason in reasons.items() if row not in (3, 17))
    where = "line 4" if not array else "row 3"
    if 3 in reasons and not keys.get("streaming") and keys["prepare"] == "eager":
        assert any(where in message for reason, message in data.train.report.problems.values() if reason == "not UTF-8")
