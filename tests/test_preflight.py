"""Preflight: a run that cannot succeed says so, and what to do, before any weights load; sftkit check says the
same. Each case is a real condition: an unreachable model, a too long max_length, an output_dir holding another
run, a disk too small for a checkpoint, conversations without a chat template."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil

import pytest
from helpers import ROOT, sharegpt_row, write_jsonl

from sftkit import embedded
from sftkit.errors import SftkitError
from sftkit.jobs.check import check
from sftkit.setup.preflight import preflight
from sftkit.setup.resolve import load_recipe

QUICKSTART = ROOT / "configs" / "recipes" / "quickstart.yaml"


def recipe(tmp_path, **overrides):
    """The quickstart's recipe, without its overwrite_output_dir (a recipe of one's own has none)."""
    return load_recipe(str(QUICKSTART), {"output_dir": str(tmp_path / "out"), "overwrite_output_dir": False,
                                         **overrides})


def copied_model(tmp_path, edit_config=None, keep_template: bool = True):
    folder = tmp_path / "model"
    shutil.copytree(embedded.resolve("embedded:tiny-qwen2"), folder)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **edit_config}))
    if not keep_template:
        (folder / "chat_template.jinja").unlink()
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        settings.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return str(folder)


@pytest.mark.slow
def test_an_unreachable_model_says_how_to_point_at_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SftkitError, match=r"model_name_or_path no-such-org/no-such-model: cannot be read .*"
                                          r"huggingface-cli download no-such-org/no-such-model --local-dir DIR"):
        preflight(recipe(tmp_path, model_name_or_path="no-such-org/no-such-model"))


def test_max_length_beyond_the_models_positions(tmp_path):
    with pytest.raises(SftkitError, match="max_length 4096 is beyond the 2048 positions of embedded:tiny-qwen2"):
        preflight(recipe(tmp_path, max_length=4096))


def test_an_output_dir_holding_a_finished_run_is_refused_unless_overwritten_or_resumed(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"")
    with pytest.raises(SftkitError, match="holds a finished run: choose another output_dir, or set overwrite_output_dir"):
        preflight(recipe(tmp_path))
    with pytest.raises(SftkitError, match="holds a finished run"):  # sftkit check runs the same preflight
        check(recipe(tmp_path), 0, colour=False)
    preflight(recipe(tmp_path, overwrite_output_dir=True))
    with pytest.raises(SftkitError, match="holds a finished run"):  # auto finds no checkpoint: a fresh start
        preflight(recipe(tmp_path, resume_from_checkpoint="auto"))
    (tmp_path / "out" / "checkpoint-200").mkdir()
    (tmp_path / "out" / "checkpoint-200" / "trainer_state.json").write_text('{"global_step": 1, "max_steps": 1000}')
    preflight(recipe(tmp_path, resume_from_checkpoint="auto"))  # goes on from its last checkpoint


def test_the_checkpoints_of_a_stopped_run_are_refused_unless_resumed_or_overwritten(tmp_path):
    (tmp_path / "out" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 1, "max_steps": 1000}')
    with pytest.raises(SftkitError, match="holds checkpoint-4 of a run that did not finish: set "
                                          "resume_from_checkpoint: auto"):
        preflight(recipe(tmp_path))
    preflight(recipe(tmp_path, resume_from_checkpoint="auto"))


def test_overwriting_removes_the_old_runs_checkpoints(tmp_path):
    from sftkit.jobs.train import train

    (tmp_path / "out" / "checkpoint-40").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-40" / "trainer_state.json").write_text('{"global_step": 1, "max_steps": 1000}')
    train(recipe(tmp_path, overwrite_output_dir=True, max_steps=2, eval_strategy="no", eval_on_start=False),
          save=False)
    assert not (tmp_path / "out" / "checkpoint-40").exists()  # a later resume cannot pick the old run's


def test_a_disk_too_small_for_a_checkpoint(tmp_path):
    huge = copied_model(tmp_path, {"hidden_size": 32768, "intermediate_size": 131072, "num_hidden_layers": 128,
                                   "num_attention_heads": 256, "num_key_value_heads": 256,
                                   "layer_types": ["full_attention"] * 128})
    with pytest.raises(SftkitError, match=r"a checkpoint of .* takes about [\d.]+ GiB and its disk has [\d.]+ GiB "
                                          r"free; free some space or choose an output_dir on a larger disk"):
        preflight(recipe(tmp_path, model_name_or_path=huge))


@pytest.mark.skipif(os.geteuid() == 0, reason="the superuser may write anywhere, so nothing is unwritable to it")
def test_an_output_dir_that_cannot_be_written(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SftkitError, match="is not writable"):
        preflight(recipe(tmp_path, output_dir=str(locked / "out")))


def test_conversations_without_a_chat_template_say_how_to_set_one(tmp_path):
    rows = [sharegpt_row(index, ("human", "Hi?"), ("gpt", "Hello.")) for index in range(10)]
    with pytest.raises(SftkitError, match="has no chat template to render them .* Set chat_template_path"):
        check(recipe(tmp_path, model_name_or_path=copied_model(tmp_path, keep_template=False),
                     dataset_name=str(write_jsonl(tmp_path / "rows.jsonl", rows))), 0, colour=False)


@pytest.mark.parametrize("overrides, says", [
    ({"report_to": "tensorbord"}, "report_to: 'tensorbord' is not a tracker; did you mean tensorboard?"),
    ({"report_to": "wandb"}, "report_to: wandb is not installed"),
    ({"push_to_hub": True}, "push_to_hub: true needs a Hugging Face token"),
])
def test_check_predicts_what_training_refuses_before_any_data_is_read(tmp_path, monkeypatch, overrides, says):
    """sftkit check says what training would refuse, and both refuse before the data (missing here) is read."""
    if "wandb" in overrides.get("report_to", "") and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no token saved by a login
    monkeypatch.delenv("HF_TOKEN", raising=False)
    bad = recipe(tmp_path, dataset_name=str(tmp_path / "missing.jsonl"), **overrides)
    with pytest.raises(SftkitError, match=re.escape(says)):
        check(bad, 1, colour=False)
    from sftkit.jobs.train import train

    with pytest.raises(SftkitError, match=re.escape(says)):
        train(bad)


def test_push_to_hub_with_a_token_but_no_hub_is_refused_before_any_data_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SftkitError, match="push_to_hub: true, but HF_HUB_OFFLINE is set"):
        preflight(recipe(tmp_path, dataset_name=str(tmp_path / "missing.jsonl"), push_to_hub=True))
