"""The loss guard stops a run at a NaN or infinite loss or gradient, or a gradient norm past grad_norm_limit, naming
the step, the rows of its batch and the last good checkpoint; no checkpoint holds what the bad step spoiled."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT
from safetensors.torch import load_file

from sftkit.errors import SftkitError
from sftkit.jobs.train import train
from sftkit.setup.resolve import load_recipe

QUICKSTART = ROOT / "configs" / "recipes" / "quickstart.yaml"


def run(tmp_path, **overrides):
    recipe = load_recipe(str(QUICKSTART), {"output_dir": str(tmp_path), "eval_strategy": "no", "eval_on_start": False,
                                           "test_split_size": 0, **overrides})
    with pytest.raises(SftkitError) as stopped:
        train(recipe)
    return str(stopped.value)


def test_a_diverging_run_stops_at_its_first_bad_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # A learning rate of 1000 without clipping: the gradient is NaN by the third step.
    said = run(tmp_path, max_steps=12, learning_rate=1e3, max_grad_norm=0, save_steps=2, logging_steps=4)
    assert said.startswith("training stopped: the gradient norm was NaN or infinite at step 3; its batch trained "
                           "rows "), said
    assert f"the last good checkpoint is {tmp_path / 'checkpoint-2'}" in said
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]  # not the step-4 save
    assert not (tmp_path / "model.safetensors").exists()
    weights = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_a_gradient_norm_past_the_limit_stops_the_run(tmp_path):
    said = run(tmp_path, max_steps=4, grad_norm_limit=0.5, logging_steps=1)
    assert "past grad_norm_limit 0.5 at step 1; its batch trained rows " in said
    assert "no checkpoint was saved before it" in said


def test_the_rows_named_are_the_batch_of_that_step(tmp_path):
    said = run(tmp_path, max_steps=4, grad_norm_limit=0.5, logging_steps=1, per_device_train_batch_size=2)
    from sftkit.data.order import training_order

    named = said.split("its batch trained rows ")[1].split(";")[0]
    first_batch = sorted(int(row) for row in training_order(range(600), seed=42)[:2])  # quickstart: 600 rows
    assert named == ", ".join(map(str, first_batch))
