"""The training loss reproduces the model's own head, whatever it does after ``hidden @ W.T``: a logit scale (Cohere,
Granite), a cap (Gemma 2), a bias (Phi), an adapter or a trained copy (PEFT). Tiny random models built from configs,
fp32 on the CPU: every path that runs here trains the model's own loss and gradients within 1e-4, and the choice of
path is checked for the CUDA-only kernels (liger, cce) as pure functions and through stand-ins for their kernels."""

from __future__ import annotations

import inspect
import logging

import datasets
import numpy as np
import pytest
import torch
from helpers import ROOT, TINY_MODEL
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoTokenizer,
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from trl import SFTConfig

from sftkit import embedded
from sftkit.data.order import EpochOrder
from sftkit.errors import SftkitError
from sftkit.recipe import Decisions
from sftkit.setup.speed import resolve_speed
from sftkit.train import head_loss as head_loss_module
from sftkit.train import levers
from sftkit.train.batches import FACTS_KEY
from sftkit.train.counting import CountingCollator
from sftkit.train.head_loss import (
    LABEL_POSITIONS,
    Head,
    add_head_loss,
    exact_path,
    inspect_head,
    kernel_features,
    kernel_refusal,
    label_positions,
)
from sftkit.train.trainer import RunRules, SftkitTrainer

TOLERANCE = 1e-4
VOCAB = 634  # the embedded tokenizer's
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 631, "bos_token_id": 631,
         "eos_token_id": 631}


class HalvedQwen2(Qwen2ForCausalLM):
    """A head no config key describes: its logits halved in the forward. TRL's head reads scales by name only."""

    def forward(self, *args, labels=None, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 0.5
        if labels is not None:
            output.loss = self.loss_function(output.logits, labels, self.config.vocab_size)
        return output


def _model(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant == "cohere":
        return CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.0625))
    if variant == "granite":
        return GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=8.0))
    if variant == "gemma2":  # a large cap would never bind on a tiny model's logits: 2 does
        return Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=2.0))
    if variant == "phi":
        model = PhiForCausalLM(PhiConfig(**SMALL))
        torch.nn.init.normal_(model.lm_head.bias)  # initialised to zero, which would hide a missing bias
        return model
    model_class = HalvedQwen2 if variant == "halved" else Qwen2ForCausalLM
    return model_class(Qwen2Config(**SMALL, tie_word_embeddings=variant == "trainable_tokens"))


PEFT = {  # a trained copy of lm_head; a tied model whose new tokens train (peft then wraps lm_head too)
    "modules_to_save": LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM"),
    "trainable_tokens": LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 5]},
                                   task_type="CAUSAL_LM"),
}


def _rows() -> datasets.Dataset:
    rng = np.random.default_rng(0)
    rows = []
    for length in (9, 14, 6, 11):
        ids = rng.integers(0, 600, length).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})  # a prompt that does not train
    return datasets.Dataset.from_list(rows)


def _trainer(tmp_path, variant: str, path: str | None, chosen: bool = False) -> SftkitTrainer:
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to="none",
                     dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, max_length=64)
    trainer = SftkitTrainer(model=_model(variant), args=args, train_dataset=_rows(), peft_config=PEFT.get(variant),
                            processing_class=AutoTokenizer.from_pretrained(embedded.resolve(TINY_MODEL)),
                            rules=RunRules(EpochOrder(np.arange(4), 0), {}, head_loss=path, head_loss_chosen=chosen))
    trainer.data_collator = CountingCollator(trainer.data_collator, positions=True)
    return trainer


def _trained_head_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [parameter for parameter in inner.get_output_embeddings().parameters() if parameter.requires_grad]


def _first_step(trainer: SftkitTrainer) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """The first step's loss by the trainer's path and by the model's own forward, and their gradients for the
    head's trained parameters."""
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.train()
    own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    trained = _trained_head_parameters(model)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(batch[FACTS_KEY].tokens_trained))
    return (loss, own, torch.autograd.grad(loss, trained, allow_unused=True),
            torch.autograd.grad(own, trained, allow_unused=True))


# (variant, path asked) -> path taken (None: TRL's fused head)
TAKEN = {
    ("qwen2", "torch"): "torch", ("qwen2", "trl"): None, ("qwen2", "logits"): "logits",
    ("cohere", "torch"): "torch", ("cohere", "trl"): None, ("granite", "torch"): "torch", ("granite", "trl"): None,
    ("gemma2", "torch"): None, ("gemma2", "trl"): None,  # torch's kernel takes no cap; TRL's head applies it
    ("phi", "torch"): "torch", ("phi", "trl"): None,  # torch's kernel takes the bias
    ("halved", "torch"): "torch", ("halved", "trl"): "logits",  # the scale found by the probe, unknown to TRL
    ("modules_to_save", "torch"): None, ("modules_to_save", "trl"): None,  # TRL reads the trained copy's weight
    ("trainable_tokens", "torch"): "logits", ("trainable_tokens", "trl"): "logits",  # TRL's head fails on it
    ("gemma2", "logits"): "logits", ("trainable_tokens", "logits"): "logits",
}


@pytest.mark.parametrize("variant, asked", list(TAKEN))
def test_every_path_trains_the_models_own_loss_and_gradients(tmp_path, variant, asked):
    trainer = _trainer(tmp_path, variant, asked)
    assert trainer.head_loss == TAKEN[variant, asked]
    loss, own, gradients, own_gradients = _first_step(trainer)
    torch.testing.assert_close(loss, own, atol=TOLERANCE, rtol=TOLERANCE)
    assert own_gradients and all(gradient is not None for gradient in gradients)  # the head's weights train
    for gradient, expected in zip(gradients, own_gradients, strict=True):
        torch.testing.assert_close(gradient, expected, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("variant", ["halved", "trainable_tokens"])
def test_the_held_out_loss_is_the_models_own_where_trls_head_differs(tmp_path, variant):
    trainer = _trainer(tmp_path, variant, "trl")
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        own = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"]).loss
        loss = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(loss, own, atol=TOLERANCE, rtol=TOLERANCE)


def test_the_probe_finds_each_head_by_what_it_computes():
    heads = {variant: inspect_head(_model(variant)) for variant in ("qwen2", "cohere", "granite", "gemma2", "phi",
                                                                     "halved")}
    assert heads["qwen2"] == Head()
    assert heads["cohere"].scale == pytest.approx(0.0625, rel=1e-6)
    assert heads["granite"].scale == pytest.approx(1 / 8, rel=1e-6)
    assert heads["gemma2"].softcap == 2.0 and heads["gemma2"].scale == pytest.approx(1.0, rel=1e-6)
    assert heads["phi"].bias and heads["phi"].unlike is None
    assert heads["halved"].scale == pytest.approx(0.5, rel=1e-6) and "other log-probabilities" in \
        heads["halved"].trl_differs


def test_a_head_the_probe_cannot_run_gets_no_kernel():
    """A backbone that fails on the probe (an attention kernel missing here, say): no kernel is trusted with the
    head, TRL's head only where it reads a plain Linear, the model's own logits elsewhere."""
    def failing(*args, **kwargs):
        raise RuntimeError("no kernel for this attention here")

    model = _model("cohere")
    model.model.forward = failing
    head = inspect_head(model)
    assert head.unlike == "its logits could not be probed (RuntimeError: no kernel for this attention here)"
    assert exact_path("torch", head, kernel_features("torch")) == ("trl", head.unlike)
    adapted = get_peft_model(_model("qwen2"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"])).get_base_model()
    adapted.model.forward = failing
    assert exact_path("trl", inspect_head(adapted))[0] == "logits"


def test_a_lora_adapter_on_lm_head_trains_through_the_models_own_logits():
    """TRL refuses it in SftkitTrainer; a model given one anyway is never trained through a kernel or TRL's head,
    even while the adapter is fresh (its B is zero, so it reproduces the plain logits)."""
    model = get_peft_model(_model("qwen2"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    inner = model.get_base_model()
    head = inspect_head(inner)
    assert "peft.tuners.lora" in head.unlike and "bypasses trainable weights" in head.trl_differs
    path, why = exact_path("torch", head, kernel_features("torch"))
    assert path == "logits" and why == head.unlike
    add_head_loss(inner, head)
    rows = _rows()
    ids = torch.tensor(rows[0]["input_ids"])[None]
    labels = torch.tensor(rows[0]["labels"])[None]
    summed = model(input_ids=ids, labels=labels, sftkit_head_loss=path, **{LABEL_POSITIONS: label_positions(labels)})
    own = model(input_ids=ids, labels=labels).loss
    trained = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(summed / trained, own, atol=TOLERANCE, rtol=TOLERANCE)
    lora_b = inner.lm_head.lora_B["default"].weight
    (gradient,) = torch.autograd.grad(summed / trained, [lora_b])
    assert gradient.abs().sum() > 0
    torch.testing.assert_close(gradient, torch.autograd.grad(own, [lora_b])[0], atol=TOLERANCE, rtol=TOLERANCE)


def test_a_lora_adapter_on_lm_head_is_refused_before_any_data_is_read(tmp_path):
    from sftkit.jobs.train import head_loss
    from sftkit.setup.resolve import load_recipe

    for targets in (["q_proj", "lm_head"], ["lm_head"], [".*"]):  # one name is read as a pattern
        recipe = load_recipe(str(ROOT / "configs" / "recipes" / "quickstart.yaml"),
                             {"output_dir": str(tmp_path), "use_peft": True, "lora_target_modules": targets})
        with pytest.raises(SftkitError, match="lora_target_modules includes lm_head.*lora_modules_to_save"):
            head_loss(recipe)
    recipe = load_recipe(str(ROOT / "configs" / "recipes" / "quickstart.yaml"),
                         {"output_dir": str(tmp_path), "use_peft": True, "lora_target_modules": ["all-linear"],
                          "lm_head_loss": "logits"})
    assert head_loss(recipe) == "logits"


def test_the_run_record_says_what_computed_the_loss(tmp_path):
    """A LoRA run whose lm_head trains in full (modules_to_save): the torch kernel asked for gives way to TRL's
    head, which reads the trained copy, and the record says so beside the recipe's value."""
    import yaml

    from sftkit.jobs.train import train
    from sftkit.setup.resolve import load_recipe

    recipe = load_recipe(str(ROOT / "configs" / "recipes" / "quickstart.yaml"), {
        "output_dir": str(tmp_path), "max_steps": 1, "eval_strategy": "no", "eval_on_start": False,
        "test_split_size": 0, "lm_head_loss": "torch", "use_peft": True, "lora_target_modules": ["q_proj", "v_proj"],
        "lora_modules_to_save": ["lm_head"]})
    train(recipe, save=False)
    record = yaml.safe_load((tmp_path / "sftkit_run.yaml").read_text())
    assert record["recipe"]["lm_head_loss"] == "torch"
    assert record["lm_head_loss_used"]["path"] == "trl"
    assert "ModulesToSaveWrapper" in record["lm_head_loss_used"]["why"]


def test_a_fallback_warns_when_asked_and_notes_when_sftkit_chose(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sftkit")
    _trainer(tmp_path, "gemma2", "torch")
    [record] = [record for record in caplog.records if "does not reproduce" in record.message]
    assert record.levelno == logging.WARNING
    assert "lm_head_loss torch does not reproduce this model's head: the model caps its logits " \
           "(final_logit_softcapping 2), which this kernel cannot; the loss is computed by TRL's fused head" \
           in record.message
    caplog.clear()
    _trainer(tmp_path, "gemma2", "torch", chosen=True)
    [record] = [record for record in caplog.records if "does not reproduce" in record.message]
    assert record.levelno == logging.INFO


def test_a_failing_kernel_gives_way_to_the_exact_path(tmp_path):
    """The levers' proof drops a kernel for TRL's head only where that reproduces the model's head."""
    for variant, fallback in (("qwen2", None), ("halved", "logits")):
        trainer = _trainer(tmp_path, variant, "torch")
        assert trainer.head_loss == "torch"
        levers.DROP["lm_head_loss"](trainer)
        assert trainer.head_loss == fallback
        loss, own, _, _ = _first_step(trainer)
        torch.testing.assert_close(loss, own, atol=TOLERANCE, rtol=TOLERANCE)


def test_loss_type_dft_refuses_a_head_trls_head_does_not_reproduce(tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", loss_type="dft",
                     dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)
    with pytest.raises(SftkitError, match="loss_type dft is computed by TRL's fused head, which does not reproduce"):
        SftkitTrainer(model=_model("halved"), args=args, train_dataset=_rows(),
                      processing_class=AutoTokenizer.from_pretrained(embedded.resolve(TINY_MODEL)),
                      rules=RunRules(EpochOrder(np.arange(4), 0), {}, head_loss=None))


# The CUDA-only kernels: what they take decides where they run.

def test_the_choice_for_each_head_and_kernel():
    liger = cce = {"bias", "softcap"}
    old_cce = {"softcap"}  # cut-cross-entropy before it took a bias
    torch_kernel = kernel_features("torch")
    assert torch_kernel == {"bias"}
    capped, biased = Head(softcap=30.0), Head(bias=True)
    adapted = Head(unlike="its lm_head is a LoRA layer", trl_differs="TRL's fused head bypasses it")
    wrapped = Head(unlike="its lm_head is a ModulesToSaveWrapper")
    assert exact_path("liger", capped, liger) == ("liger", None)
    assert exact_path("cce", Head(scale=0.0625, softcap=30.0, bias=True), cce) == ("cce", None)
    assert exact_path("torch", capped, torch_kernel) == ("trl", kernel_refusal(capped, torch_kernel))
    assert exact_path("cce", biased, old_cce)[0] == "trl"
    assert "adds a bias" in kernel_refusal(biased, old_cce)
    for kernel, features in (("liger", liger), ("cce", cce), ("torch", torch_kernel)):
        assert exact_path(kernel, adapted, features) == ("logits", adapted.unlike)
        assert exact_path(kernel, wrapped, features) == ("trl", wrapped.unlike)
    assert exact_path("trl", adapted) == ("logits", adapted.trl_differs)
    assert exact_path("trl", capped) == ("trl", None)
    assert exact_path("logits", Head()) == ("logits", None)


def test_kernel_features_are_read_from_the_installed_signatures(monkeypatch):
    def old_cce(e, c, targets, ignore_index=-100, softcap=None, reduction="mean", shift=False, filter_eps="auto"):
        raise AssertionError

    def liger(input, weight, target, bias=None, ce_weight=None, ignore_index=-100, softcap=None, accum_dtype=None):
        raise AssertionError

    kernels = {"cce": old_cce, "liger": liger}
    monkeypatch.setattr(head_loss_module, "_kernel_function", lambda kernel: kernels[kernel])
    assert kernel_features("cce") == {"softcap"} and kernel_features("liger") == {"bias", "softcap"}


@pytest.fixture
def cuda_kernels_on_cpu(monkeypatch):
    """liger and cce stand-ins with their signatures that compute what they compute, in plain torch: what sftkit
    hands them (scale folded in, bias, cap) is checked against the model's own loss. Records their keywords."""
    calls = []

    def reference(hidden, weight, targets, bias=None, softcap=None):
        logits = torch.nn.functional.linear(hidden, weight, bias)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")

    def cce(e, c, targets, bias=None, ignore_index=-100, softcap=None, reduction="mean", shift=0, filter_eps="auto"):
        calls.append({"kernel": "cce", "bias": bias is not None, "softcap": softcap, "reduction": reduction,
                      "filter_eps": filter_eps})
        return reference(e, c, targets, bias, softcap)

    def liger(input, weight, target, bias=None, ignore_index=-100, reduction="mean", softcap=None, accum_dtype=None):
        calls.append({"kernel": "liger", "bias": bias is not None, "softcap": softcap, "reduction": reduction,
                      "accum_dtype": accum_dtype})
        return reference(input, weight, target, bias, softcap)

    kernels = {"cce": cce, "liger": liger, "torch": torch.nn.functional.linear_cross_entropy}
    monkeypatch.setattr(head_loss_module, "_kernel_function", lambda kernel: kernels[kernel])
    head_loss_module.sum_of_losses.cache_clear()
    yield calls
    head_loss_module.sum_of_losses.cache_clear()


@pytest.mark.parametrize("kernel", ["liger", "cce"])
@pytest.mark.parametrize("variant", ["cohere", "granite", "gemma2", "phi", "halved"])
def test_cuda_kernels_are_handed_the_whole_head(cuda_kernels_on_cpu, kernel, variant):
    model = _model(variant)
    head = inspect_head(model)
    assert exact_path(kernel, head, kernel_features(kernel)) == (kernel, None)
    add_head_loss(model, head)
    rows = _rows()
    ids, labels = torch.tensor([rows[1]["input_ids"]]), torch.tensor([rows[1]["labels"]])
    summed = model(input_ids=ids, labels=labels, sftkit_head_loss=kernel, **{LABEL_POSITIONS: label_positions(labels)})
    own = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(summed / int((labels[:, 1:] != -100).sum()), own, atol=TOLERANCE, rtol=TOLERANCE)
    [call] = cuda_kernels_on_cpu
    assert call["reduction"] == "sum" and call["softcap"] == head.softcap and call["bias"] == head.bias
    assert call.get("filter_eps", None) is None and call.get("accum_dtype", torch.float32) == torch.float32


def test_a_kernel_handed_a_cap_it_does_not_take_fails_instead_of_ignoring_it():
    summed = head_loss_module.sum_of_losses("torch")
    assert "softcap" not in inspect.signature(summed).parameters
    with pytest.raises(TypeError):
        summed(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), softcap=30.0)


def test_logits_is_a_recipe_choice_kept_on_any_machine():
    for gpu in (None, 80 * 2**30):
        values = {"lm_head_loss": "logits"}
        values |= resolve_speed(values, Decisions("recipe.yaml"), gpu_memory=gpu)
        assert values["lm_head_loss"] == "logits"
