"""Speed levers proven before step 1: one that sftkit chose and that fails on this machine gives way to the plain
path with a warning; one the recipe asked for fails the run with the error it met. On the CPU the lever made to
fail is torch_varlen attention, whose kernel runs on CUDA only."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from helpers import ROOT

from sftkit.errors import SftkitError
from sftkit.jobs.train import train
from sftkit.setup.resolve import load_recipe
from sftkit.train.attention import VARLEN

QUICKSTART = ROOT / "configs" / "recipes" / "quickstart.yaml"


def packed_recipe(tmp_path):
    recipe = load_recipe(str(QUICKSTART), {"output_dir": str(tmp_path), "max_steps": 2, "packing": True,
                                           "eval_strategy": "no", "eval_on_start": False, "test_split_size": 0,
                                           "logging_steps": 1})
    recipe.model.attn_implementation = VARLEN  # what sftkit gives packed rows on a GPU; on a CPU it cannot run
    recipe.values["attn_implementation"] = VARLEN
    return recipe


def test_a_lever_sftkit_chose_that_fails_here_is_dropped_and_the_run_trains(tmp_path, caplog):
    recipe = packed_recipe(tmp_path)
    recipe.chosen_levers = ["attn_implementation"]
    caplog.set_level(logging.WARNING, logger="sftkit")
    train(recipe)
    assert f"speed: attn_implementation {VARLEN}, which sftkit chose for this machine, fails here before the first " \
           "step" in caplog.text and "it is dropped for sdpa. Set attn_implementation in the recipe to choose." \
           in caplog.text
    record = yaml.safe_load((tmp_path / "sftkit_run.yaml").read_text())
    assert record["levers_dropped"] == {"attn_implementation": VARLEN} and record["result"]["steps"] == 2
    losses = [entry["loss"] for entry in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]
    assert len(losses) == 2


def test_a_lever_the_recipe_asked_for_fails_the_run_with_its_error(tmp_path):
    recipe = packed_recipe(tmp_path)  # chosen_levers empty: the recipe asked for it
    with pytest.raises(SftkitError, match=f"attn_implementation: {VARLEN} \\(as the recipe says\\) fails on this "
                                          "machine before the first step: .*Remove it from the recipe"):
        train(recipe)
