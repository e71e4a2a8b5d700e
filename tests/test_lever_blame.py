"""A speed lever that fails before step 1 is blamed on whoever set it: the recipe (the run stops), sftkit, or the
library's default (it is dropped, with a warning that says which). TRL's default optim is fused AdamW: a recipe
that never names optim must not read "optim: adamw_torch_fused (as the recipe says)"."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from sftkit.errors import SftkitError
from sftkit.train import levers


def recipe(values: dict, chosen: list[str]) -> SimpleNamespace:
    """What prove_levers reads of a Recipe: fused AdamW in effect, the other levers plain."""
    return SimpleNamespace(
        values=values, chosen_levers=chosen, model=SimpleNamespace(attn_implementation=None),
        sftkit=SimpleNamespace(lm_head_loss="trl"),
        training=SimpleNamespace(optim="adamw_torch_fused", dataloader_num_workers=0, gradient_checkpointing=True))


@pytest.fixture
def trainer(monkeypatch):
    """A trainer whose one step fails while fused AdamW is in effect."""
    trainer = SimpleNamespace(head_loss=None, is_fsdp_enabled=False, accelerator=SimpleNamespace(num_processes=1),
                              args=SimpleNamespace(optim="adamw_torch_fused"))

    def one_step(trainer):
        if trainer.args.optim == "adamw_torch_fused":
            raise RuntimeError("fused AdamW does not run on this device")

    monkeypatch.setattr(levers, "_one_step", one_step)
    return trainer


@pytest.mark.parametrize("values, chosen, says", [
    ({}, [], "which is the default"),
    ({"optim": "adamw_torch_fused"}, ["optim"], "which sftkit chose for this machine"),
])
def test_a_lever_the_recipe_did_not_set_is_dropped_and_named_for_who_set_it(trainer, caplog, values, chosen, says):
    caplog.set_level(logging.WARNING, logger="sftkit")
    assert levers.prove_levers(trainer, recipe(values, chosen)) == ["optim"]
    assert trainer.args.optim == "adamw_torch"
    assert f"speed: optim adamw_torch_fused, {says}, fails here before the first step" in caplog.text
    assert "as the recipe says" not in caplog.text


def test_a_lever_the_recipe_set_stops_the_run_and_is_blamed_on_the_recipe(trainer):
    with pytest.raises(SftkitError, match=r"^optim: adamw_torch_fused \(as the recipe says\) fails on this machine"):
        levers.prove_levers(trainer, recipe({"optim": "adamw_torch_fused"}, []))
