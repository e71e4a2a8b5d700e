"""Speed defaults a GPU run gets without asking, and one batch shape for torch.compile, checked on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import MappingProxyType

import pytest
import torch
from helpers import ROOT, TINY_MODEL
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import add_fused_lm_head

from sftkit.errors import SftkitError
from sftkit.recipe import Decisions
from sftkit.setup import resolve
from sftkit.setup.resolve import resolve_device, resolve_precision
from sftkit.setup.speed import resolve_speed, training_memory_estimate
from sftkit.train.batches import FACTS_KEY
from sftkit.train.compilation import FixedShapeCollator
from sftkit.train.counting import CountingCollator

GIB = 2**30


def _kept_for_backward(model: torch.nn.Module, tokens: int, autocast: bool) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (the weights themselves left out), through the
    fused head training uses (TRL's: no logits are built)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    with (torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor),
          torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)):
        model(input_ids=ids, labels=ids, use_cache=False, fused_lm_head=True)
    return sum(kept.values())


def test_fused_adamw_is_the_default_on_cuda_only_and_an_explicit_optim_wins():
    values, notes = {}, []
    values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=80 * GIB)
    assert values["optim"] == "adamw_torch_fused" and notes
    values = {"optim": "adamw_torch"}
    values |= resolve_speed(values, Decisions("recipe.yaml"), gpu_memory=80 * GIB)
    assert values["optim"] == "adamw_torch"
    values = {}
    values |= resolve_speed(values, Decisions("recipe.yaml"), gpu_memory=None)
    assert "optim" not in values


def test_decisions_return_what_they_set_and_change_nothing_they_read(monkeypatch):
    """Each decision reads the values read-only, as resolve passes them, and returns the keys it sets: here a recipe
    that every speed decision acts on, after the device and precision decisions."""
    monkeypatch.setattr(resolve, "has_accelerator", lambda: False)
    monkeypatch.setattr(resolve, "gpu_count", lambda: 0)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)  # the precision decision pins it
    written = {"model_name_or_path": TINY_MODEL, "packing": True, "use_liger_kernel": True, "torch_compile": True,
               "max_length": 512, "per_device_train_batch_size": 2}
    record, decisions = dict(written), Decisions("recipe.yaml")
    record |= resolve_device(MappingProxyType(record), decisions)
    record |= resolve_precision(MappingProxyType(record), decisions)
    assert record == {**written, "use_cpu": True, "bf16": False, "fp16": False}
    decided = resolve_speed(MappingProxyType(record), decisions, gpu_memory=80 * GIB)
    assert set(decided) == {"optim", "attn_implementation", "lm_head_loss", "fixed_batch_shape",
                            "dataloader_num_workers", "dataloader_persistent_workers", "gradient_checkpointing",
                            *(["use_liger_kernel"] if importlib.util.find_spec("liger_kernel") is None else [])}


def test_levers_that_cannot_run_here_fall_back_and_say_so():
    values, notes = {"attn_implementation": "flex_attention"}, []
    values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=None)
    assert values["attn_implementation"] == "sdpa" and "flex_attention: trains on a CUDA GPU only" in notes[0]
    if importlib.util.find_spec("flash_attn") is None:
        for attention, missing in (("flash_attention_2", "flash-attn 2 is not installed"),
                                   ("flash_attention_4", "flash-attn-4 is not installed")):
            values, notes = {"model_name_or_path": TINY_MODEL, "attn_implementation": attention}, []
            values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=80 * GIB)
            assert values["attn_implementation"] == "sdpa" and any(missing in note for note in notes)
    if importlib.util.find_spec("liger_kernel") is None:
        values, notes = {"use_liger_kernel": True}, []
        values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=80 * GIB)
        assert values["use_liger_kernel"] is False and any("liger-kernel package" in note for note in notes)
    values, notes = {"use_liger_kernel": True}, []
    values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=None)
    assert values["use_liger_kernel"] is False and any("use_liger_kernel needs" in note for note in notes)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-mixed"])
@pytest.mark.parametrize("hidden, intermediate", [(128, 704), (384, 2048)])
def test_memory_estimate_covers_what_autograd_keeps(hidden, intermediate, autocast):
    # What 512 more tokens cost, measured and estimated: the weights' and optimizer's share cancels out.
    config = Qwen2Config(vocab_size=3000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=3,
                         num_attention_heads=hidden // 64, num_key_value_heads=2)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa").train()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer adds it
    measured = _kept_for_backward(model, 1024, autocast) - _kept_for_backward(model, 512, autocast)
    estimated = (training_memory_estimate(config, 1024, True, autocast)
                 - training_memory_estimate(config, 512, True, autocast))
    assert measured <= estimated <= 2 * measured  # errs high (it counts transient gradients too), not wildly


def test_checkpointing_is_off_when_the_run_fits_and_on_when_it_does_not():
    base = {"model_name_or_path": TINY_MODEL, "per_device_train_batch_size": 8, "max_length": 1024}
    values, notes = dict(base), []
    values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=80 * GIB)
    assert values["gradient_checkpointing"] is False
    assert any("gradient checkpointing off" in note and "of this GPU's 80.0 GiB" in note for note in notes)
    values, notes = dict(base), []
    # the tiny model's full-vocabulary head needs more
    values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=GIB // 20)
    assert values["gradient_checkpointing"] is True and any("gradient checkpointing on" in n for n in notes)


def test_an_explicit_checkpointing_choice_wins_and_the_cpu_keeps_trl_default():
    values = {"model_name_or_path": TINY_MODEL, "gradient_checkpointing": True}
    values |= resolve_speed(values, Decisions("recipe.yaml"), gpu_memory=80 * GIB)
    assert values["gradient_checkpointing"] is True
    values = {"model_name_or_path": TINY_MODEL, "activation_checkpointing": True}  # transformers 5's new name
    values |= resolve_speed(values, Decisions("recipe.yaml"), gpu_memory=80 * GIB)
    assert "gradient_checkpointing" not in values
    values = {"model_name_or_path": TINY_MODEL}
    values |= resolve_speed(values, Decisions("recipe.yaml"), gpu_memory=None)
    assert values == {"model_name_or_path": TINY_MODEL, "lm_head_loss": "trl"}  # only TRL's head is chosen on a CPU


def test_packed_rows_get_variable_length_attention_on_a_gpu_only():
    values, notes = {"model_name_or_path": TINY_MODEL, "packing": True}, []
    values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=80 * GIB)
    # No flash-attn package here: torch's own variable-length kernel (a Qwen2 model supports it).
    assert values["attn_implementation"] == "torch_varlen"
    assert any("packed rows use torch_varlen (variable-length attention, no mask)" in note for note in notes)
    for given, gpu in (({"model_name_or_path": TINY_MODEL, "packing": False}, 80 * GIB),
                       ({"model_name_or_path": TINY_MODEL, "packing": True}, None)):
        given |= resolve_speed(given, Decisions("recipe.yaml"), gpu_memory=gpu)
        assert "attn_implementation" not in given
    values, notes = {"model_name_or_path": TINY_MODEL, "packing": True, "attn_implementation": "sdpa",
                     "per_device_train_batch_size": 64, "max_length": 1024}, []
    values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=80 * GIB)
    assert values["attn_implementation"] == "sdpa"
    assert any("dense mask of 65,536 x 65,536 tokens (4.0 GiB)" in note for note in notes)


def test_attention_is_chosen_by_what_the_model_supports(monkeypatch):
    from sftkit.setup import speed

    class NoVarlenNoFlex:  # a model class whose attention layers take neither
        _supports_flash_attn = False
        _supports_flex_attn = False

    class FlexOnly:
        _supports_flash_attn = False
        _supports_flex_attn = True

    for model_class, expected, said in ((FlexOnly, "flex_attention", "flex_attention (a block mask"),
                                        (NoVarlenNoFlex, None, "supports neither variable-length nor flex")):
        monkeypatch.setattr(speed, "_model_class", lambda config, model_class=model_class: model_class)
        values, notes = {"model_name_or_path": TINY_MODEL, "packing": True}, []
        values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=80 * GIB)
        assert values.get("attn_implementation") == expected and any(said in note for note in notes)
        values, notes = {"model_name_or_path": TINY_MODEL, "packing": True, "attn_implementation": "torch_varlen"}, []
        # asked for, but the model cannot: sdpa, said
        values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=80 * GIB)
        assert values["attn_implementation"] == "sdpa"
        assert any("torch_varlen: this model's attention layers do not support it" in note for note in notes)


def test_the_loss_comes_from_a_kernel_on_a_gpu_and_from_trls_head_where_none_runs():
    values, notes = {}, []
    values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=80 * GIB)
    # Neither liger-kernel nor cut-cross-entropy here: torch's chunked kernel (torch 2.13).
    assert values["lm_head_loss"] == "torch" and any("torch linear cross-entropy kernel" in note for note in notes)
    values, notes = {"lm_head_loss": "cce"}, []
    values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=None)
    assert values["lm_head_loss"] == "trl"
    assert any("lm_head_loss cce:" in note and "using TRL's fused head" in note for note in notes)
    values = {"lm_head_loss": "torch"}
    values |= resolve_speed(values, Decisions("recipe.yaml"), gpu_memory=None)  # asked for, and it runs on a CPU: kept
    assert values["lm_head_loss"] == "torch"


def test_variable_length_attention_needs_packed_rows():
    with pytest.raises(SftkitError, match="torch_varlen attends within packed sequences only: add packing: true"):
        resolve_speed({"attn_implementation": "torch_varlen"}, Decisions("recipe.yaml"), gpu_memory=80 * GIB)


def test_gpu_runs_load_data_in_worker_processes_unless_told_otherwise():
    values, notes = {}, []
    values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=80 * GIB)
    assert values["dataloader_num_workers"] >= 1 and values["dataloader_persistent_workers"] is True


def test_cpus_are_those_this_process_may_use():
    """A container or a job scheduler gives a process fewer CPUs than the machine has: workers follow the share."""
    code = ("import os; from sftkit.hardware import usable_cpus; "
            "os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1]); print(usable_cpus(), os.cpu_count())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    usable, machine = map(int, result.stdout.split())
    assert usable == 1 and machine >= 1
    values = {"dataloader_num_workers": 0}
    values |= resolve_speed(values, Decisions("recipe.yaml"), gpu_memory=80 * GIB)
    assert values["dataloader_num_workers"] == 0 and "dataloader_persistent_workers" not in values


def test_fixed_shape_padding_is_a_sequence_of_its_own_and_not_counted(tokenizer):
    """Every packed batch gets one shape; the real tokens' logits are what they are without the padding, and the
    tokens counted are the real ones."""
    trl_collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    collate = FixedShapeCollator(CountingCollator(trl_collate, positions=False), 64, tokenizer.pad_token_id)
    rows = [{"input_ids": list(range(10, 30)), "labels": list(range(10, 30)), "seq_lengths": [12, 8]},
            {"input_ids": list(range(40, 55)), "labels": list(range(40, 55)), "seq_lengths": [15]}]
    batch = collate(rows)
    assert batch["input_ids"].shape == (1, 64) and batch[FACTS_KEY].tokens_fed == 35
    assert batch["position_ids"][0, 35:].tolist() == list(range(29))  # one sequence, positions counting up
    assert (batch["labels"][0, 35:] == -100).all()
    assert batch["cu_seq_lens_q"].tolist() == [0, 12, 20, 35, 64]
    assert batch["seq_idx"][0, 35:].unique().tolist() == [3]
    plain = trl_collate(rows)

    from transformers import AutoModelForCausalLM

    from sftkit import embedded

    model = AutoModelForCausalLM.from_pretrained(embedded.resolve(TINY_MODEL)).eval()
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=plain["input_ids"], position_ids=plain["position_ids"], use_cache=False).logits
    torch.testing.assert_close(padded[:, :35], alone, atol=1e-5, rtol=0)
    doubled = collate(rows * 2)  # more than one shape's worth: the next multiple
    assert doubled["input_ids"].shape == (1, 128) and doubled[FACTS_KEY].tokens_fed == 70


def _train(tmp_path, name: str, *overrides: str) -> tuple[list[float], float, str]:
    output = tmp_path / name
    result = subprocess.run(
        [sys.executable, "-m", "sftkit", "--config", "configs/recipes/quickstart.yaml", "--output_dir", str(output),
         "--packing", "true", "--max_steps", "6", "--logging_steps", "1", "--eval_strategy", "no",
         "--eval_on_start", "false", "--test_split_size", "0", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "TORCH_LOGS": "recompiles,dynamo"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "loss" in entry]
    return [entry["loss"] for entry in steps], steps[-1]["num_tokens"], result.stderr


@pytest.mark.slow
def test_compiled_packed_training_compiles_once_and_trains_the_same(tmp_path):
    plain_losses, plain_tokens, _ = _train(tmp_path, "plain")
    losses, tokens, log = _train(tmp_path, "compiled", "--torch_compile", "true")
    assert "batches padded to one shape" in log and "torch_compile: 4 decoder layers compiled, each on its own" in log
    # One decoder layer's code traced once, for all four layers and all six steps: packed batches of changing
    # length would recompile without the fixed shape.
    assert log.count("torchdynamo done tracing") == 1 and "Recompiling" not in log
    assert tokens == plain_tokens  # the padding is not counted as tokens seen
    # fp32 on both paths; the compiled kernels sum in another order, so equal within float rounding.
    assert losses == pytest.approx(plain_losses, rel=1e-5)


def test_a_fixed_shape_needs_a_length_to_fix():
    with pytest.raises(SftkitError, match="fixed_batch_shape: true pads batches to max_length, which is null"):
        resolve_speed({"fixed_batch_shape": True, "max_length": None}, Decisions("recipe.yaml"), gpu_memory=None)
    values, notes = {"torch_compile": True, "max_length": None}, []
    values |= resolve_speed(values, Decisions("recipe.yaml", notes), gpu_memory=None)
    assert "fixed_batch_shape" not in values and "compiles anew" in notes[-1]
