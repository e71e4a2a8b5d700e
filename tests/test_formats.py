"""Every recipe of docs/formats.md: sftkit check shows exactly what training trains, and the recipe trains."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys

import pytest
from helpers import ROOT

from sftkit.data.bad_rows import INVALID_KEY
from sftkit.data.preparation import prepare_data
from sftkit.jobs.check import check, mark_trained
from sftkit.setup.resolve import load_recipe
from sftkit.train.model import load_tokenizer

RECIPES = sorted((ROOT / "configs" / "recipes" / "formats").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_check_shows_what_training_trains(tmp_path, path):
    recipe = load_recipe(str(path), {"output_dir": str(tmp_path / "out")})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        check(recipe, 3, colour=False)
    assert printed.getvalue().rstrip().endswith("training would start: ok")
    data = prepare_data(recipe, load_tokenizer(recipe))  # what training prepares, on its own path
    tokenizer = load_tokenizer(recipe)
    trained = data.train.on_demand if data.train.on_demand is not None else data.train.rows
    ids = trained.data.column("row").to_pylist() if data.train.on_demand is not None else trained["row"]
    for block in printed.getvalue().split("\n--- ")[1:]:
        row = int(re.match(r".*? row (\d+): ", block)[1])  # "SOURCE row N: ..."
        item = trained[ids.index(row)]
        assert item.get(INVALID_KEY) is None
        assert mark_trained(list(item["input_ids"]), list(item["labels"]), tokenizer, colour=False) in block
        assert "the prompt is token for token what inference sends" in block


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_the_recipe_trains(tmp_path, path):
    result = subprocess.run([sys.executable, "-m", "sftkit", "--config", str(path), "--output_dir", str(tmp_path),
                             "--max_steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sftkit: training finished" in result.stdout
