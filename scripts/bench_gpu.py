"""GPU throughput: plain TRL's best configuration against sftkit's GPU recipe, same model, data and invocation.

    python scripts/bench_gpu.py [--steps 30] [--warmup 8]     # on the GPU machine
    python scripts/bench_gpu.py --tiny                        # every path that can run on a CPU, small

Qwen2.5-0.5B's architecture with random weights (throughput does not depend on weight values),
text of log-normal lengths (about 350 tokens at the median) in a byte-level BPE tokenizer trained on
it (the model keeps Qwen2.5's 151,936-row vocabulary, so the LM head costs what it costs there). Each configuration runs in its own process. Reported: tokens/s after warm-up,
MFU, peak memory, and the first 20 per-step losses, then the ratios against plain TRL.

MFU = tokens/s x FLOP per token / the card's dense bf16 peak (989 TFLOP/s for H100 SXM and H200),
with FLOP per token = 6 x parameters (the tied LM head counted once, as the matrix product it is)
+ 12 x layers x hidden size x mean attended context, where the mean attended context of a causal
sequence of length n is (n + 1) / 2, averaged over tokens. The fraction of a measured bf16
matrix-product ceiling (8192 x 8192 products on this card) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
CONFIGS = {
    # name: what runs it, and how
    "trl_best": "plain TRL: packing (bfd, padding-free), bf16 weights, flex attention, no gradient checkpointing",
    "sftkit": "sftkit's GPU recipe (configs/recipes/qwen2.5-0.5b-infinity-instruct.yaml): mixed precision",
    "sftkit_bf16": "the same recipe with pure bf16 weights (dtype: bfloat16), shown against mixed precision",
}


def model_config(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def build_assets(work: Path, tiny: bool) -> tuple[Path, Path]:
    """A random-weight model, a byte-level BPE tokenizer (Qwen2's kind) trained on the text, and the text."""
    import random

    import numpy as np
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

    model_dir, data = work / "model", work / "rows.jsonl"
    if model_dir.exists():
        return model_dir, data
    rng, words = np.random.default_rng(0), random.Random(0)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    # Word counts log-normal around 230, about 350 tokens a row once tokenized; 32..4096 tokens.
    counts = np.clip(rng.lognormal(np.log(230), 0.9, size=200 if tiny else 6000), 20, 2700).astype(int)
    with data.open("w") as file:
        for count in counts:
            text = " ".join("".join(words.choices(syllables, k=words.randint(1, 3))) for _ in range(count))
            file.write(json.dumps({"text": text}) + "\n")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000 if tiny else 16000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator((json.loads(line)["text"] for line in data.open()), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)  # the model keeps Qwen2.5's full vocabulary: the LM head costs what it costs there
    Qwen2ForCausalLM(model_config(tiny)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, data


def token_lengths(model_dir: Path, data: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in data.open()]
    return [min(len(ids) + 1, 1024) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def flop_per_token(tiny: bool, lengths: list[int]) -> float:
    config = model_config(tiny)
    from transformers import Qwen2ForCausalLM

    with __import__("torch").device("meta"):
        parameters = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    mean_context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    return 6 * parameters + 12 * config.num_hidden_layers * config.hidden_size * mean_context


class Clock:
    """A TrainerCallback (built lazily, so this module imports without transformers) timing steps and losses."""

    def __new__(cls, marks: dict):
        import torch
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks.setdefault("time", {})[state.global_step] = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "num_tokens" in logs:
                    marks.setdefault("tokens", {})[state.global_step] = float(logs["num_tokens"])
                if logs and "loss" in logs:
                    marks.setdefault("loss", {})[state.global_step] = float(logs["loss"])

        return _Clock()


def run_one(name: str, work: Path, tiny: bool, steps: int, warmup: int) -> dict:
    import torch

    model_dir, data = build_assets(work, tiny)
    marks: dict = {}
    cuda = torch.cuda.is_available()
    common = dict(output_dir=str(work / f"out-{name}"), max_steps=steps, logging_steps=1, report_to="none",
                  save_strategy="no", learning_rate=1e-5, per_device_train_batch_size=4, max_length=1024,
                  packing=True, gradient_checkpointing=False, seed=0, lr_scheduler_type="constant", warmup_steps=0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if name == "trl_best":
        import datasets
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        attention = "flex_attention" if cuda else "sdpa"
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention,
                                                     dtype=torch.bfloat16 if cuda else torch.float32)
        args = SFTConfig(**common, bf16=cuda, use_cpu=not cuda)
        trainer = SFTTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(model_dir),
                             train_dataset=datasets.load_dataset("json", data_files=str(data), split="train"),
                             callbacks=[Clock(marks)])
        trainer.train()
    else:
        from sftkit.recipe import load_recipe, read_recipe_file
        from sftkit.train import train

        recipe = read_recipe_file(str(ROOT / "configs" / "recipes" / "qwen2.5-0.5b-infinity-instruct.yaml"))
        recipe.pop("dataset_config")  # the data here is a local text file
        values = {**recipe, **common, "model_name_or_path": str(model_dir), "dataset_name": str(data),
                  "assistant_only_loss": False, "dataloader_num_workers": 0 if tiny else 2}
        if name == "sftkit_bf16" and cuda:
            values["dtype"] = "bfloat16"
        file = work / f"{name}.yaml"
        file.write_text(json.dumps(values))
        train(load_recipe(str(file)), callbacks=[Clock(marks)])
    seconds = marks["time"][steps] - marks["time"][warmup]
    tokens = marks["tokens"][steps] - marks["tokens"][warmup]
    return {
        "name": name,
        "tokens_per_s": tokens / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "losses": [marks["loss"][step] for step in sorted(marks["loss"])][:20],
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def matmul_ceiling_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192**3 * repeats / (time.perf_counter() - start) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a toy model on the CPU: checks every path that runs")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sftkit-bench-gpu")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one configuration, in a child process
    options = parser.parse_args()
    steps, warmup = (6, 2) if options.tiny else (options.steps, options.warmup)
    work = options.workdir / ("tiny" if options.tiny else "full")
    work.mkdir(parents=True, exist_ok=True)
    if options.run:
        result = run_one(options.run, work, options.tiny, steps, warmup)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    if not torch.cuda.is_available():
        print("skipped on this machine (no CUDA GPU): bf16 and pure-bf16 weights, flex attention, fused AdamW, "
              "peak memory, MFU and the matrix-product ceiling; the paths below run in fp32 with sdpa")
    lengths = token_lengths(*build_assets(work, options.tiny))
    results = {}
    for name, what in CONFIGS.items():
        print(f"running {name}: {what}", flush=True)
        child = subprocess.run([sys.executable, __file__, "--run", name, "--workdir", str(options.workdir),
                                *(["--tiny"] if options.tiny else [])],
                               capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            sys.exit(f"{name} failed:\n{child.stderr[-3000:]}")
        results[name] = json.loads(lines[0][len("RESULT "):])

    per_token = flop_per_token(options.tiny, lengths)
    device = results["trl_best"]["device"]
    peak = next((value for key, value in SPEC_PEAK_TFLOPS.items() if key in device), None)
    ceiling = matmul_ceiling_tflops()
    base = results["trl_best"]
    print(f"\n{device}; FLOP per token {per_token / 1e9:.2f} G; spec peak {peak or '-'} TFLOP/s; "
          f"measured bf16 ceiling {f'{ceiling:.0f}' if ceiling else '-'} TFLOP/s")
    print("| configuration | tokens/s | vs plain TRL | MFU | of ceiling | peak GiB |\n|---|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        achieved = result["tokens_per_s"] * per_token / 1e12
        mfu = f"{achieved / peak:.1%}" if peak else "-"
        of_ceiling = f"{achieved / ceiling:.1%}" if ceiling else "-"
        memory = f"{result['peak_gib']:.1f}" if result["peak_gib"] is not None else "-"
        print(f"| {name} | {result['tokens_per_s']:,.0f} | {result['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
              f"{mfu} | {of_ceiling} | {memory} |")
    print("\nper-step losses (first 20):")
    for name, result in results.items():
        print(f"{name:12} " + " ".join(f"{loss:.3f}" for loss in result["losses"]))
    # bf16 keeps 8 bits of mantissa: one rounding is 0.4%, and a few steps of it stay within 2% of the loss.
    # In fp32 (--tiny) the paths compute the same thing and agree to 1e-4.
    tolerance = 2e-2 if torch.cuda.is_available() else 1e-4
    for name in ("sftkit", "sftkit_bf16"):
        pairs = list(zip(results[name]["losses"], base["losses"], strict=False))
        worst = max(abs(a - b) / abs(b) for a, b in pairs)
        verdict = "within" if worst <= tolerance else "OUTSIDE"
        print(f"{name} against trl_best: largest relative loss difference {worst:.2e}, {verdict} {tolerance:g}")


if __name__ == "__main__":
    main()
