"""One recipe, several launchers, the same optimisation: proven on CPU processes (gloo).

Every run uses the embedded model and data, the same seed and global_batch_size 16. The
single-process run accumulates two micro-batches of 8; two processes take one micro-batch of 8
each. Losses are compared step by step with a relative tolerance of 1e-5: in fp32 on a CPU the only
legitimate difference is the order in which the two halves of a gradient are summed (the
all-reduce against in-process accumulation), a rounding of about 1e-7 per step that six Adam steps
cannot grow past 1e-5. Logits of the saved models are compared within 1e-4 absolute, the same
bound taken through a forward pass of four layers.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, TINY_MODEL, write_recipe

from sftkit.errors import SftkitError
from sftkit.setup.resolve import load_recipe

pytestmark = pytest.mark.slow  # several processes, kills or whole training runs

LOSS_TOLERANCE = 1e-5
LOGIT_TOLERANCE = 1e-4
CPU_CONFIGS = ROOT / "configs" / "accelerate" / "cpu"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    return write_recipe(
        tmp_path_factory.mktemp("recipe") / "recipe.yaml",
        model_name_or_path=TINY_MODEL, dataset_name="embedded:infinity-instruct-sample",
        per_device_train_batch_size=8, global_batch_size=16, max_steps=6, logging_steps=1,
        learning_rate=3.0e-3, max_length=256, gradient_checkpointing=False, eval_strategy="no",
        save_strategy="steps", save_steps=3, seed=42, report_to="none",
    )


def launch(recipe: Path, output: Path, *launcher: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = ["accelerate", "launch", *launcher, "-m", "sftkit", "--config", str(recipe), "--output_dir", str(output),
               *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def losses(output: Path) -> list[float]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return model(torch.arange(1, 40).unsqueeze(0)).logits


def assert_same_run(output: Path, reference: Path) -> None:
    assert losses(output) == pytest.approx(losses(reference), rel=LOSS_TOLERANCE)
    assert len(losses(output)) == 6
    torch.testing.assert_close(logits(output), logits(reference), atol=LOGIT_TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def single(recipe, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("single")
    result = launch(recipe, output, "--num_processes", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def two_process_runs(recipe, tmp_path_factory) -> dict[str, Path]:
    """Each shipped CPU launcher config, run once for this module; tests share the outputs."""
    outputs = {}
    for config in ("ddp_2proc", "zero2_2proc", "zero3_2proc"):
        output = tmp_path_factory.mktemp(config)
        result = launch(recipe, output, "--config_file", str(CPU_CONFIGS / f"{config}.yaml"))
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[config] = output
    return outputs


@pytest.mark.parametrize("config", ["ddp_2proc", "zero2_2proc", "zero3_2proc"])
def test_two_processes_match_one(two_process_runs, single, config):
    output = two_process_runs[config]
    record = yaml.safe_load((output / "sftkit_run.yaml").read_text())
    assert record["processes"] == 2 and record["recipe"]["gradient_accumulation_steps"] == 1
    assert_same_run(output, single)


def test_eager_preparation_under_two_processes_matches_one(recipe, single, tmp_path):
    """Both processes wait on the cache's file lock (no collective); the rows and their order are the same."""
    result = launch(recipe, tmp_path, "--config_file", str(CPU_CONFIGS / "ddp_2proc.yaml"),
                    extra=("--prepare", "eager"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "preparation: eager (as the recipe says)" in result.stderr
    assert_same_run(tmp_path, single)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_on_one_machine_match_one_process(recipe, single, tmp_path):
    """Two machines' launchers (torchrun), each with its own process: they train the single process's run and end
    together. A process that left the group while the other still held it could abort with SIGABRT after
    training and keep the other machine at torchrun's exit barrier for 300 s; both are watched here, the outputs
    drained as they come so that neither machine ever waits on a full pipe."""
    port = str(_free_port())
    nodes = [
        subprocess.Popen(
            ["accelerate", "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
             "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
             "-m", "sftkit", "--config", str(recipe), "--output_dir", str(tmp_path)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs, ended = ["", ""], [0.0, 0.0]

    def drain(rank: int) -> None:
        outputs[rank] = nodes[rank].communicate(timeout=600)[0]
        ended[rank] = time.monotonic()

    readers = [threading.Thread(target=drain, args=(rank,)) for rank in (0, 1)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert abs(ended[0] - ended[1]) < 60, "one machine waited for the other at the exit barrier"
    for output in outputs:
        assert not re.search(r"SIGABRT|Signal 6|Fatal Python error|exit barrier", output), output[-3000:]
    assert_same_run(tmp_path, single)


@pytest.mark.parametrize("config", ["zero3_2proc"])  # ZeRO-2 and DDP: test_resume kills and resumes them
def test_checkpoint_resumes_the_same_loss_curve(recipe, single, two_process_runs, tmp_path, config):
    checkpoint = two_process_runs[config] / "checkpoint-3"
    assert len(losses(checkpoint)) == 3  # written halfway through the six steps
    result = launch(recipe, tmp_path, "--config_file", str(CPU_CONFIGS / f"{config}.yaml"),
                    extra=("--resume_from_checkpoint", str(checkpoint)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoint-6").is_dir() and not (tmp_path / "checkpoint-3").exists()  # it began at step 3
    assert_same_run(tmp_path, single)


def test_zero3_without_16bit_save_still_ends_with_a_loadable_model(recipe, single, tmp_path):
    launcher_config = tmp_path / "zero3_no_16bit_save.yaml"
    launcher_config.write_text(yaml.safe_dump({
        "distributed_type": "DEEPSPEED", "use_cpu": True, "num_processes": 2, "num_machines": 1,
        "main_process_port": 0,
        "deepspeed_config": {"zero_stage": 3, "zero3_save_16bit_model": False, "gradient_accumulation_steps": 1},
    }))
    result = launch(recipe, tmp_path / "out", "--config_file", str(launcher_config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage3_gather_16bit_weights_on_model_save" in result.stderr or "zero3_save_16bit_model" in result.stderr
    assert_same_run(tmp_path / "out", single)


def test_launcher_accumulation_that_contradicts_the_recipe_stops_before_training(recipe, tmp_path):
    launcher_config = tmp_path / "zero2_fixed_accumulation.yaml"
    launcher_config.write_text(yaml.safe_dump({
        "distributed_type": "DEEPSPEED", "use_cpu": True, "num_processes": 2, "num_machines": 1,
        "main_process_port": 0, "deepspeed_config": {"zero_stage": 2, "gradient_accumulation_steps": 4},
    }))
    result = launch(recipe, tmp_path / "out", "--config_file", str(launcher_config))
    assert result.returncode != 0
    # Every rank finds the conflict; the launcher may stop the others once the first has said so.
    assert re.search(r"sftkit: error \(rank \d\): the accelerate config sets gradient_accumulation_steps: 4",
                     result.stderr)
    assert "sftkit/" not in result.stderr  # the launcher reports the failed ranks; no sftkit frame is shown
    assert not (tmp_path / "out" / "sftkit_run.yaml").exists()


def test_deepspeed_file_with_fixed_values_is_explained(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    path = write_recipe(tmp_path / "r.yaml", model_name_or_path=TINY_MODEL, dataset_name="x.jsonl",
                        per_device_train_batch_size=8, deepspeed=str(config))
    with pytest.raises(SftkitError, match='fixes train_micro_batch_size_per_gpu: 4, but the recipe means 8.*"auto"'):
        load_recipe(str(path))
    config.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(SftkitError, match="sets bf16.enabled: true, but the recipe trains with bf16: false"):
        load_recipe(str(path))


def test_zero3_file_is_made_to_gather_weights_on_save(tmp_path, monkeypatch):
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": "auto"}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    path = write_recipe(tmp_path / "r.yaml", model_name_or_path=TINY_MODEL, dataset_name="x.jsonl")
    recipe = load_recipe(str(path))
    used = json.loads(Path(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())
    assert used["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert any("ZeRO-3" in note for note in recipe.notes)


def test_packed_batches_of_one_fixed_shape_under_two_processes_match_one_process(recipe, tmp_path):
    """The padding that gives packed batches one shape (for torch.compile) changes neither losses nor token counts,
    and nor does computing the loss from the hidden states (sftkit's head loss, normalised over both processes'
    tokens) instead of through TRL's head."""
    packed = ("--packing", "true")
    one = launch(recipe, tmp_path / "one", "--num_processes", "1", extra=(*packed, "--lm_head_loss", "trl"))
    two = launch(recipe, tmp_path / "two", "--config_file", str(CPU_CONFIGS / "ddp_2proc.yaml"),
                 extra=(*packed, "--fixed_batch_shape", "true", "--lm_head_loss", "torch"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=LOSS_TOLERANCE)

    def tokens_seen(output: Path) -> float:
        history = json.loads((output / "trainer_state.json").read_text())["log_history"]
        return next(entry["num_tokens"] for entry in reversed(history) if "num_tokens" in entry)

    assert tokens_seen(tmp_path / "two") == tokens_seen(tmp_path / "one")
