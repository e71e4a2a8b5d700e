"""Damaged files get one clear error, never a library's traceback: a checkpoint cut short or edited, a model file cut
short or made of a pickle, a disk that fills up during a save."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, TINY_MODEL, write_recipe
from safetensors.torch import save_file

from sftkit import embedded
from sftkit.errors import SftkitError
from sftkit.outputs.merge import merge
from sftkit.outputs.trained import open_trained
from sftkit.setup.resolve import load_recipe


def checkpoint(output: Path, step: int) -> Path:
    """A checkpoint's files as the trainer writes them (a state, torch archives, weights, sftkit's record)."""
    folder = output / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 100, "log_history": []}))
    torch.save({"state": {0: {"exp_avg": torch.ones(64)}}}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    save_file({"weight": torch.ones(16, 16)}, folder / "model.safetensors")
    (folder / "sftkit_checkpoint.yaml").write_text(yaml.safe_dump({"recipe": {}, "processes": 1, "rows_per_step": 8}))
    return folder


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edited(path: Path) -> None:
    """A byte of a torch archive's data changed (the archive's structure intact)."""
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    local = member.header_offset  # the local header: 30 bytes, then its own name and extra field (torch pads it)
    start = local + 30 + int.from_bytes(data[local + 26:local + 28], "little") + int.from_bytes(
        data[local + 28:local + 30], "little")
    data[start + member.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "trainer_state.json cut short": ("trainer_state.json", cut),
    "optimizer.pt edited": ("optimizer.pt", edited),
    "scheduler.pt cut short": ("scheduler.pt", cut),
    "model.safetensors cut short": ("model.safetensors", cut),
    "sftkit_checkpoint.yaml broken": ("sftkit_checkpoint.yaml", lambda path: path.write_text("recipe: [unclosed")),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_named_with_the_previous_whole_one(tmp_path, damage):
    output = tmp_path / "out"
    checkpoint(output, 2)
    latest = checkpoint(output, 4)
    name, spoil = DAMAGES[damage]
    spoil(latest / name)
    recipe = write_recipe(tmp_path / "recipe.yaml", model_name_or_path=TINY_MODEL,
                          dataset_name="embedded:infinity-instruct-sample", output_dir=str(output),
                          resume_from_checkpoint="auto")
    with pytest.raises(SftkitError) as error:
        load_recipe(str(recipe))
    message = str(error.value)
    assert f"checkpoint {latest} is damaged ({name}:" in message
    assert f"resume from {output / 'checkpoint-2'}, the latest whole checkpoint before it" in message
    with pytest.raises(SftkitError, match="is damaged"):  # named explicitly, the same
        load_recipe(str(recipe), {"resume_from_checkpoint": str(latest)})


def test_a_model_file_cut_short_is_named(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(embedded.resolve(TINY_MODEL), model)
    cut(model / "model.safetensors")
    with pytest.raises(SftkitError, match="its weights cannot be read .* a file cut short"):
        open_trained(str(model))


class RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_model_made_of_a_pickle_is_refused_without_running_it(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(embedded.resolve(TINY_MODEL), model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(str(marker))))
    with pytest.raises(SftkitError, match="its weights are a pickle file, which loads only by running the code"):
        open_trained(str(model))
    assert not marker.exists()


def test_an_adapter_cut_short_is_named_by_merge(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(embedded.resolve(TINY_MODEL))
    adapter = tmp_path / "adapter"
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path":
                                                             embedded.resolve(TINY_MODEL)}))
    cut(adapter / "adapter_model.safetensors")
    with pytest.raises(SftkitError, match=f"{adapter}: its weights cannot be read"):
        merge(str(adapter), str(tmp_path / "merged"))


@pytest.fixture
def small_disk(tmp_path):
    """A 10 MiB file system: room for the run's records and one checkpoint of the embedded model, not two."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(folder)], capture_output=True,
                             check=False)
    if mounted.returncode != 0:
        pytest.skip("mounting a small file system needs root (mount -t tmpfs) on this machine")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.slow
def test_a_disk_that_fills_up_during_a_save_is_one_clear_error(small_disk, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", model_name_or_path=TINY_MODEL,
                          dataset_name="embedded:infinity-instruct-sample", output_dir=str(small_disk / "out"),
                          max_steps=6, save_steps=2, per_device_train_batch_size=4, max_length=128, eval_strategy="no",
                          test_split_size=0, report_to="none", eval_samples=0, gradient_checkpointing=False)
    result = subprocess.run([sys.executable, "-m", "sftkit", "--config", str(recipe)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr[result.stderr.rfind("sftkit: error"):]
    assert "no space left on device writing" in message and "checkpoint-" in message, result.stderr[-3000:]
    assert "resume_from_checkpoint: auto to go on from checkpoint-2" in message
    assert "Traceback" not in result.stderr and "unexpected pos" not in result.stderr
    assert not any((small_disk / "out" / ".sftkit-staging").glob("*"))  # the half-written checkpoint is gone
