"""Mixtures: each source's share of the trained tokens, drawn at random (never a file's first rows), down-sampled or
repeated, held out before anything is drawn, and accounted for source by source."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, TINY_MODEL, write_jsonl, write_recipe

from sftkit.data.preparation import prepare_data
from sftkit.errors import SftkitError
from sftkit.setup.resolve import load_recipe
from sftkit.train.model import load_tokenizer

SHARES = (0.5, 0.3, 0.2)
WORDS = ("alpha", "beta", "gamma", "delta", "omega", "sigma")


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def three_sources(folder: Path, sorted_by_length: bool = True) -> list[Path]:
    """Three formats of different lengths. The long conversations are sorted by length, as files often are: their
    first rows are the shortest, so a mixture that took them would miss its token share."""
    rng = random.Random(0)
    replies = [rng.randint(10, 40) for _ in range(300)]
    replies = sorted(replies) if sorted_by_length else replies
    long = write_jsonl(folder / "long.jsonl", [
        {"conversations": [{"from": "human", "value": words(rng, 4)}, {"from": "gpt", "value": words(rng, count)}]}
        for count in replies])
    short = write_jsonl(folder / "short.jsonl", [
        {"instruction": words(rng, 3), "input": "", "output": words(rng, rng.randint(1, 5))} for _ in range(500)])
    mid = write_jsonl(folder / "mid.jsonl", [
        {"messages": [{"role": "user", "content": words(rng, 4)},
                      {"role": "assistant", "content": words(rng, rng.randint(5, 15))}]} for _ in range(120)])
    return [long, short, mid]


def mixture_recipe(folder: Path, **values) -> Path:
    entries = [{"path": str(path), "fraction": share} for path, share in zip(three_sources(folder), SHARES, strict=True)]
    return write_recipe(folder / "mixture.yaml", model_name_or_path=TINY_MODEL, output_dir=str(folder / "out"),
                        report_to="none", assistant_only_loss=True, max_length=128, datasets=entries,
                        test_split_size=0.1, prepare="eager", **values)


@pytest.mark.parametrize("how", ["under", "over"])
def test_realised_token_shares_are_the_asked_ones_within_two_points(tmp_path, how):
    recipe = load_recipe(str(mixture_recipe(tmp_path, mixture=how)))
    data = prepare_data(recipe, load_tokenizer(recipe))
    train = [account for account in data.accounts if account.split == "train"]
    assert [account.asked for account in train] == pytest.approx(SHARES)
    for account in train:
        assert abs(account.share - account.asked) < 0.02, account
    draws = [source.draw for source in data.plan.sources]
    available = [drawn.available for drawn in draws]
    drawn = [drawn.drawn for drawn in draws]
    if how == "under":  # no row twice, and the scarcest source gives every row it has
        assert all(d <= a for d, a in zip(drawn, available, strict=True)) and drawn.count(max(drawn)) >= 1
        assert any(d == a for d, a in zip(drawn, available, strict=True))
    else:  # the most plentiful source gives every row once; the others repeat theirs
        assert any(d == a for d, a in zip(drawn, available, strict=True))
        assert any(d > a for d, a in zip(drawn, available, strict=True))


def test_rows_are_drawn_at_random_and_held_out_rows_never_train(tmp_path):
    recipe = load_recipe(str(mixture_recipe(tmp_path, mixture="over")))
    data = prepare_data(recipe, load_tokenizer(recipe))
    long = data.plan.sources[0]
    train_rows, eval_rows = set(long.train.lines.tolist()), set(long.eval.lines.tolist())
    assert not train_rows & eval_rows  # a repeated row is never on both sides
    assert long.source.train.num_rows == 300  # the plan selects rows; the loaded source stays as it was loaded
    assert len(eval_rows) == 30  # test_split_size 0.1 of each source
    # Down-sampled from a file sorted by length: the rows drawn span the file, not its first (shortest) rows.
    folder = tmp_path / "under"
    folder.mkdir()
    under = load_recipe(str(mixture_recipe(folder, mixture="under")))
    drawn = prepare_data(under, load_tokenizer(under)).plan.sources[0].train.lines
    assert len(drawn) < 270 and drawn.max() > 250 and drawn.min() < 20


@pytest.mark.slow
def test_a_mixture_trains_and_accounts_for_every_source(tmp_path):
    recipe = mixture_recipe(tmp_path, max_steps=4, per_device_train_batch_size=4, logging_steps=2, eval_steps=2,
                            eval_strategy="steps", eval_samples=0, save_strategy="no")
    result = subprocess.run([sys.executable, "-m", "sftkit", "--config", str(recipe)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = result.stdout[result.stdout.index("sftkit: training finished"):]
    for name in ("long", "short", "mid"):  # the held-out loss of each source, and its share of the train tokens
        assert f"\n  {name:<5}  " in summary
        assert any(line.strip().startswith(str(tmp_path / f"{name}.jsonl")) and "asked" in line
                   for line in summary.splitlines())
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert {f"eval_{name}_loss" for name in ("long", "short", "mid")} <= {key for entry in history for key in entry}
    record = yaml.safe_load((tmp_path / "out" / "sftkit_run.yaml").read_text())
    accounts = record["data"]["sources"]
    assert [(account["split"], Path(account["source"]).stem) for account in accounts] == [
        ("train", "long"), ("train", "short"), ("train", "mid"), ("eval", "long"), ("eval", "short"), ("eval", "mid")]
    assert all(account["tokens_trained"] > 0 for account in accounts)


def test_a_skipped_row_is_named_by_its_line_in_the_file(tmp_path):
    sources = three_sources(tmp_path)
    lines = sources[1].read_text().splitlines()
    lines[7] = json.dumps({"instruction": "", "input": "", "output": ""})  # nothing to train on
    sources[1].write_text("\n".join(lines) + "\n")
    recipe = load_recipe(str(write_recipe(
        tmp_path / "r.yaml", model_name_or_path=TINY_MODEL, output_dir=str(tmp_path / "out"), report_to="none",
        datasets=[{"path": str(path), "fraction": share} for path, share in zip(sources, SHARES, strict=True)],
        mixture="over", on_invalid="skip", prepare="eager")))
    data = prepare_data(recipe, load_tokenizer(recipe))
    data.write_skipped(str(tmp_path / "out"), resuming=False)
    listed = [json.loads(line) for line in (tmp_path / "out" / "skipped_rows.jsonl").read_text().splitlines()]
    assert listed and {entry["source_row"] for entry in listed} == {7}
    assert all(entry["data"]["instruction"] == "" for entry in listed)


def test_mixture_needs_fractions_and_fractions_must_be_positive(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a {index}"} for index in range(10)])
    with pytest.raises(SftkitError, match="mixture only takes effect on a datasets: mixture whose entries set fraction"):
        load_recipe(str(write_recipe(tmp_path / "r.yaml", model_name_or_path=TINY_MODEL, output_dir=str(tmp_path),
                                     datasets=[{"path": str(first)}], mixture="over")))
    recipe = load_recipe(str(write_recipe(tmp_path / "r.yaml", model_name_or_path=TINY_MODEL, output_dir=str(tmp_path),
                                          datasets=[{"path": str(first), "fraction": 0.0}, {"path": str(first),
                                                                                            "fraction": 1.0}])))
    with pytest.raises(SftkitError, match="every fraction must be above 0"):
        prepare_data(recipe, load_tokenizer(recipe))


@pytest.mark.parametrize("recipe", ["mixture.yaml", "streaming.yaml"])
def test_the_shipped_mixture_recipes_check_with_their_account(recipe, tmp_path, capsys):
    from sftkit.cli import main

    path = ROOT / "configs" / "recipes" / recipe
    assert main(["check", "--config", str(path), "--rows", "0", "--output_dir", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert "training would start: ok" in shown
    account = shown[shown.index("sources "):shown.index("lengths ")]
    for source, share in (("infinity-instruct-sample", "50.0%"), ("messages.jsonl", "30.0%"), ("alpaca.jsonl", "20.0%")):
        assert any(source in line and f"{share} asked" in line for line in account.splitlines()), account


def test_a_share_more_than_two_points_off_is_a_warning_that_names_the_source(caplog):
    from sftkit.data.account import SourceAccount, check_shares

    def account(source: str, share: float, asked: float, sample: bool = False) -> SourceAccount:
        return SourceAccount(source, "train", 100, 100, {}, 0, 1000, 500, share, asked, sample)

    with caplog.at_level("WARNING", logger="sftkit"):
        check_shares([account("chat.jsonl", 0.47, 0.5), account("tools.jsonl", 0.53, 0.5),
                      account("code.jsonl", 0.3, 0.5, sample=True)])
    assert "tools.jsonl realised 53.0% of the train split's trained tokens against 50.0% asked" in caplog.text
    assert "chat.jsonl" in caplog.text and "code.jsonl" not in caplog.text  # a lazy run's sample is not judged
