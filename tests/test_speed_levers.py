"""Speed levers compute what the plain path computes: the head loss without logits, variable-length attention,
token counts taken on the CPU. fp32 on a CPU, within 1e-5."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import sftkit.train.attention
from sftkit.errors import SftkitError
from sftkit.train.attention import VARLEN, use_varlen_attention
from sftkit.train.batches import FACTS_KEY
from sftkit.train.counting import CountingCollator
from sftkit.train.head_loss import LABEL_POSITIONS, Head, add_head_loss

TOLERANCE = 1e-5


def _train(tmp_path, name: str, *overrides: str) -> tuple[list[float], float, str]:
    output = tmp_path / name
    result = subprocess.run(
        [sys.executable, "-m", "sftkit", "--config", "configs/recipes/quickstart.yaml", "--output_dir", str(output),
         "--max_steps", "6", "--logging_steps", "1", "--eval_strategy", "no", "--eval_on_start", "false",
         "--test_split_size", "0", "--assistant_only_loss", "true", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "loss" in entry]
    return [entry["loss"] for entry in steps], steps[-1]["num_tokens"], result.stderr


@pytest.mark.slow
def test_torch_head_loss_trains_the_losses_of_trls_head(tmp_path):
    """Padded batches of eight conversations, only the replies trained: the kernel projects the trained positions
    alone and divides by the same token count as TRL."""
    plain, plain_tokens, _ = _train(tmp_path, "trl", "--lm_head_loss", "trl")
    kernel, tokens, _ = _train(tmp_path, "torch", "--lm_head_loss", "torch")
    assert "lm_head_loss: torch" in (tmp_path / "torch" / "sftkit_run.yaml").read_text()
    assert kernel == pytest.approx(plain, rel=TOLERANCE) and len(kernel) == 6
    assert tokens == plain_tokens


def _tiny(attention: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return Qwen2ForCausalLM._from_config(config, attn_implementation=attention)


def _packed_batch(positions: bool = False) -> dict:
    torch.manual_seed(1)
    rows = [{"input_ids": torch.randint(0, 1000, (n,)).tolist()} for n in (7, 12, 5)]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    rows[1]["labels"][:6] = [-100] * 6  # a prompt that does not train
    collate = CountingCollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True), positions)
    return collate(rows)


def test_head_loss_is_the_summed_cross_entropy_of_the_trained_positions():
    batch = _packed_batch(positions=True)
    model = _tiny("sdpa")
    add_head_loss(model, Head())  # a plain head (tests/test_head_loss.py probes the others)
    summed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                   sftkit_head_loss="torch", **{LABEL_POSITIONS: batch[FACTS_KEY].label_positions})
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    reference = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="sum")
    torch.testing.assert_close(summed, reference, atol=TOLERANCE, rtol=TOLERANCE)
    counted = batch[FACTS_KEY]
    assert counted.tokens_trained == len(counted.label_positions) == int((batch["labels"][0, 1:] != -100).sum())
    assert counted.tokens_fed == 24


def _reference_varlen_kernel(query, key, value, boundaries, longest, scale):
    """What torch's CUDA varlen_attn computes, in sdpa on the CPU: causal attention within each sequence (a mask
    built on the device, so it reads nothing back to the host)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    positions = torch.arange(query.shape[0])
    sequence = torch.searchsorted(boundaries, positions, right=True)
    mask = (sequence[:, None] == sequence[None, :]) & (positions[:, None] >= positions[None, :])
    q, k, v = (tensor.transpose(0, 1) for tensor in (query, key, value))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    """torch's varlen kernel runs on CUDA only: on the CPU the attention function gets a reference kernel."""
    monkeypatch.setattr(sftkit.train.attention, "_torch_varlen_kernel", lambda: _reference_varlen_kernel)
    use_varlen_attention()


def test_varlen_attention_trains_what_sdpa_trains_on_packed_rows(varlen_on_cpu):
    """Layout, grouped heads, scale and sequence boundaries: loss and gradients equal sdpa's block-diagonal mask."""
    batch = _packed_batch()
    inputs = {key: batch[key] for key in ("input_ids", "position_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k",
                                          "max_length_q", "max_length_k")}
    results = []
    for attention in ("sdpa", VARLEN):
        model = _tiny(attention)
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad))
    torch.testing.assert_close(results[1][0], results[0][0], atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(results[1][1], results[0][1], atol=TOLERANCE, rtol=TOLERANCE)


def test_varlen_attention_refuses_batches_that_are_not_packed(varlen_on_cpu):
    ids = torch.randint(0, 1000, (2, 6))
    with pytest.raises(SftkitError, match="needs padding-free batches"):
        _tiny(VARLEN)(input_ids=ids, use_cache=False)


def test_the_torch_kernel_reports_the_loss_of_bf16_inputs_in_fp32():
    """torch's own sum of bf16 per-token losses comes back in bf16, about 1% off: the logged loss must not be."""
    from sftkit.train.head_loss import sum_of_losses

    torch.manual_seed(0)
    hidden, weight = torch.randn(300, 64, dtype=torch.bfloat16), torch.randn(1000, 64, dtype=torch.bfloat16)
    targets = torch.randint(0, 1000, (300,))
    reference = torch.nn.functional.cross_entropy(hidden.float() @ weight.float().T, targets, reduction="sum")
    assert sum_of_losses("torch")(hidden, weight, targets).item() == pytest.approx(reference.item(), rel=1e-3)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of a tensor's value by the host (int(), .item(), bool(), .tolist()): on a GPU, each one makes
    the CPU wait for every kernel queued before it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("head, synchronised", [("torch", False), ("trl", True)])
def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch, varlen_on_cpu, head,
                                                            synchronised):
    """With a GPU's levers (variable-length attention, a head-loss kernel), a training step and the row policy
    read no value back from the device; TRL's head path does (its metrics), which shows the count sees one."""
    from sftkit.jobs.train import train
    from sftkit.setup.resolve import load_recipe
    from sftkit.train.row_policy import RowPolicy
    from sftkit.train.trainer import SftkitTrainer

    mode = _HostReads()

    def counted(function):
        def wrapper(*args, **kwargs):
            with mode:
                return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(SftkitTrainer, "compute_loss", counted(SftkitTrainer.compute_loss))
    monkeypatch.setattr(RowPolicy, "on_step_end", counted(RowPolicy.on_step_end))
    recipe = load_recipe(str(ROOT / "configs" / "recipes" / "quickstart.yaml"), {
        "output_dir": str(tmp_path), "max_steps": 3, "eval_strategy": "no", "eval_on_start": False,
        "test_split_size": 0, "lm_head_loss": head, "packing": True})
    recipe.model.attn_implementation = VARLEN  # what a GPU gets (a CPU would fall back to sdpa)
    train(recipe, save=False)
    assert (mode.reads > 0) is synchronised
