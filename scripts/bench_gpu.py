"""GPU throughput: plain TRL's best configuration against sftkit's GPU recipe, same model, data and invocation.

    python scripts/bench_gpu.py [--steps 30] [--warmup 8] [--only sftkit,sftkit_sdpa] [--json bench.json]
    python scripts/bench_gpu.py --tiny                        # every path that can run on a CPU, small
    bash scripts/gpu_check.sh                                 # the GPU machine's one prepared command

Qwen2.5-0.5B's architecture with random weights (throughput does not depend on weight values),
text of log-normal lengths (about 350 tokens at the median) in a byte-level BPE tokenizer trained on
it (the model keeps Qwen2.5's 151,936-row vocabulary, so the LM head costs what it costs there). Each configuration runs in its own process. Reported: tokens/s after warm-up,
MFU, peak memory, and the first 20 per-step losses, then the ratios against plain TRL.
Besides the recipe itself, each lever configuration is the recipe with one change, so that every
lever is weighed by measurement. A configuration that fails or outlasts --timeout is reported as
failed and the others still run; only plain TRL failing stops the benchmark (the ratios need it).

MFU = tokens/s x FLOP per token / the card's dense bf16 peak (989 TFLOP/s for H100 SXM and H200),
with FLOP per token = 6 x parameters (the tied LM head counted once, as the matrix product it is)
+ 12 x layers x hidden size x mean attended context, where the mean attended context of a causal
sequence of length n is (n + 1) / 2, averaged over tokens. The fraction of a measured bf16
matrix-product ceiling (8192 x 8192 products on this card) is printed beside it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
SPEC_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
RECIPE = ROOT / "configs" / "recipes" / "qwen2.5-0.5b-infinity-instruct.yaml"


class Config(NamedTuple):
    """One measured configuration: what it is, and the recipe keys it changes (None: plain TRL, no sftkit)."""

    what: str
    changes: dict[str, Any] | None = None
    needs_cuda: str = ""  # why it cannot run on a CPU, where it cannot


# The first three are the comparison; each sftkit_* lever after them is the recipe with one change.
# The slowest (compile) runs last, so a spent --budget costs the fewest measurements.
CONFIGS = {
    "trl_best": Config("plain TRL: packing (bfd, padding-free), bf16 weights, flex attention, no gradient "
                       "checkpointing"),
    "sftkit": Config(f"sftkit's GPU recipe ({RECIPE.relative_to(ROOT)}): mixed precision, and the speed levers "
                     "sftkit chooses on this machine", {}),
    "sftkit_bf16": Config("the recipe with pure bf16 weights (dtype: bfloat16), shown against mixed precision",
                          {"dtype": "bfloat16"}),
    "sftkit_sdpa": Config("the recipe with attn_implementation: sdpa (flex attention against sdpa)",
                          {"attn_implementation": "sdpa"}),
    "sftkit_liger": Config("the recipe with use_liger_kernel: true (Liger's fused linear cross-entropy and kernels)",
                           {"use_liger_kernel": True}, needs_cuda="Liger's kernels are Triton, CUDA only"),
    "sftkit_gc": Config("the recipe with gradient_checkpointing: true (what activation recomputation costs)",
                        {"gradient_checkpointing": True}),
    "sftkit_compile": Config("the recipe with torch_compile: true (packed batches kept to one shape)",
                             {"torch_compile": True}),
}
LOSS_STEPS = 20  # the per-step losses compared and printed


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
    common = {"output_dir": str(work / f"out-{name}"), "max_steps": steps, "logging_steps": 1, "report_to": "none",
              "save_strategy": "no", "learning_rate": 1e-5, "per_device_train_batch_size": 4, "max_length": 1024,
              "packing": True, "seed": 0, "lr_scheduler_type": "constant", "warmup_steps": 0}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if name == "trl_best":
        import datasets
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        attention = "flex_attention" if cuda else "sdpa"
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention,
                                                     dtype=torch.bfloat16 if cuda else torch.float32)
        args = SFTConfig(**common, gradient_checkpointing=False, bf16=cuda, use_cpu=not cuda)
        trainer = SFTTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(model_dir),
                             train_dataset=datasets.load_dataset("json", data_files=str(data), split="train"),
                             callbacks=[Clock(marks)])
        trainer.train()
    else:
        from sftkit.recipe import load_recipe, read_recipe_file
        from sftkit.train import train

        recipe = read_recipe_file(str(RECIPE))
        recipe.pop("dataset_config")  # the data here is a local text file
        changes = dict(CONFIGS[name].changes)
        if not cuda:
            changes.pop("dtype", None)  # a CPU runs every path in fp32 (the skipped line says so)
        # The speed levers the recipe leaves unset (attention, checkpointing, data workers) are sftkit's to choose.
        # Every row prepared and packed, as plain TRL does, so that both train on the same packed sequences.
        values = {**recipe, **common, "model_name_or_path": str(model_dir), "dataset_name": str(data),
                  "assistant_only_loss": False, "prepare": "eager", **changes}
        file = work / f"{name}.yaml"
        file.write_text(json.dumps(values))
        train(load_recipe(str(file)), callbacks=[Clock(marks)])
    seconds = marks["time"][steps] - marks["time"][warmup]
    tokens = marks["tokens"][steps] - marks["tokens"][warmup]
    return {
        "name": name,
        "tokens_per_s": tokens / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "losses": [marks["loss"][step] for step in sorted(marks["loss"])][:LOSS_STEPS],
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


def run_child(name: str, options: argparse.Namespace, limit: float) -> dict:
    """One configuration in its own process group: a crash or a hang stays there, and its workers end with it."""
    command = [sys.executable, __file__, "--run", name, "--workdir", str(options.workdir),
               "--steps", str(options.steps), "--warmup", str(options.warmup), *(["--tiny"] if options.tiny else [])]
    # The children import this checkout's sftkit, whether or where it is installed.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # A process group of its own, in this session: a machine's cleanup of the session still reaches it.
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": path}, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # data-loader and compile workers too, and their GPU memory
        stdout, stderr = child.communicate()
        return {"name": name, "failed": f"timed out after {limit:.0f} s\n{tail(stderr)}"}
    finally:
        if child.poll() is None:  # this process was interrupted or terminated: the child goes with it
            os.killpg(child.pid, signal.SIGKILL)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not lines:
        return {"name": name, "failed": f"exit status {child.returncode}\n{tail(stderr)}"}
    return json.loads(lines[0][len("RESULT "):])


def tail(text: str, count: int = 15) -> str:
    """The last lines of a child's stderr: where it failed, without pages of warnings before it."""
    return "\n".join(text.rstrip().splitlines()[-count:])


def compare_losses(results: dict[str, dict], tolerance: float) -> list[dict]:
    """Each sftkit configuration against plain TRL, and pure bf16 weights against mixed precision."""
    pairs = [(name, "trl_best") for name in results if name != "trl_best"] + [("sftkit_bf16", "sftkit")]
    comparisons = []
    for name, against in pairs:
        if "losses" not in results.get(name, {}) or "losses" not in results.get(against, {}):
            continue
        steps = list(zip(results[name]["losses"], results[against]["losses"], strict=False))
        worst = max(abs(a - b) / abs(b) for a, b in steps)
        comparisons.append({"name": name, "against": against, "steps": len(steps),
                            "largest_relative_difference": worst, "tolerance": tolerance,
                            "within": worst <= tolerance})
    return comparisons


def environment(device: str) -> dict:
    """What the numbers were measured on: they differ between cards, versions and runs."""
    import torch

    versions = {}
    for package in ("torch", "transformers", "trl", "datasets", "liger-kernel"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"device": device, "cuda": torch.version.cuda, "python": sys.version.split()[0], **versions,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a toy model on the CPU: checks every path that runs")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--only", type=lambda text: text.split(","), default=list(CONFIGS),
                        help=f"configurations to run, comma-separated (trl_best always runs): {', '.join(CONFIGS)}")
    parser.add_argument("--timeout", type=float, default=240, help="seconds one configuration may take (failed after)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds all configurations may take together; each is given what is left, at most "
                             "--timeout, and one reached with nothing left is reported as not run")
    parser.add_argument("--json", type=Path, help="also write the table, losses and environment here")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sftkit-bench-gpu")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one configuration, in a child process
    options = parser.parse_args()
    if unknown := sorted(set(options.only) - set(CONFIGS)):
        parser.error(f"unknown configuration {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    if options.tiny:
        options.steps, options.warmup = 6, 2
    work = options.workdir / ("tiny" if options.tiny else "full")
    work.mkdir(parents=True, exist_ok=True)
    if options.run:
        result = run_one(options.run, work, options.tiny, options.steps, options.warmup)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # a terminated benchmark ends its child too
    cuda = torch.cuda.is_available()
    selected = [name for name in CONFIGS if name == "trl_best" or name in options.only]
    skipped = {name: CONFIGS[name].needs_cuda for name in selected if CONFIGS[name].needs_cuda and not cuda}
    if not cuda:
        levers = "".join(f"; {name} ({why})" for name, why in skipped.items())
        print("skipped on this machine (no CUDA GPU): bf16 and pure-bf16 weights, flex attention, fused AdamW, "
              f"peak memory, MFU and the matrix-product ceiling{levers}; the paths below run in fp32 with sdpa")
    lengths = token_lengths(*build_assets(work, options.tiny))
    results: dict[str, dict] = {}
    deadline = time.monotonic() + options.budget if options.budget is not None else None
    for name in (name for name in selected if name not in skipped):
        left = deadline - time.monotonic() if deadline is not None else options.timeout
        if left < 1:
            results[name] = {"name": name, "failed": "not run: --budget spent", "wall_s": 0.0}
            print(f"{name} failed: not run: --budget spent", flush=True)
            continue
        print(f"running {name}: {CONFIGS[name].what}", flush=True)
        started = time.monotonic()
        results[name] = run_child(name, options, min(options.timeout, left))
        results[name]["wall_s"] = round(time.monotonic() - started, 1)
        if "failed" in results[name]:
            if name == "trl_best":
                sys.exit(f"trl_best failed (the ratios are against it): {results[name]['failed']}")
            print(f"{name} failed: {results[name]['failed']}", flush=True)

    per_token = flop_per_token(options.tiny, lengths)
    base = results["trl_best"]
    device = base["device"]
    peak = next((value for key, value in SPEC_PEAK_TFLOPS.items() if key in device), None)
    ceiling = matmul_ceiling_tflops()
    print(f"\n{device}; FLOP per token {per_token / 1e9:.2f} G; spec peak {peak or '-'} TFLOP/s; "
          f"measured bf16 ceiling {f'{ceiling:.0f}' if ceiling else '-'} TFLOP/s")
    print("| configuration | tokens/s | vs plain TRL | MFU | of ceiling | peak GiB | wall s |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        if "failed" in result:
            print(f"| {name} | failed ({result['failed'].splitlines()[0]}) | - | - | - | - | {result['wall_s']} |")
            continue
        achieved = result["tokens_per_s"] * per_token / 1e12
        result.update(vs_trl=result["tokens_per_s"] / base["tokens_per_s"], tflops=achieved,
                      mfu=achieved / peak if peak else None, of_ceiling=achieved / ceiling if ceiling else None)
        mfu = f"{result['mfu']:.1%}" if peak else "-"
        of_ceiling = f"{result['of_ceiling']:.1%}" if ceiling else "-"
        memory = f"{result['peak_gib']:.1f}" if result["peak_gib"] is not None else "-"
        print(f"| {name} | {result['tokens_per_s']:,.0f} | {result['vs_trl']:.2f}x | {mfu} | {of_ceiling} | "
              f"{memory} | {result['wall_s']} |")
    print(f"\nper-step losses (first {LOSS_STEPS}):")
    for name, result in results.items():
        if "losses" in result:
            print(f"{name:15} " + " ".join(f"{loss:.3f}" for loss in result["losses"]))
    # bf16 keeps 8 bits of mantissa: one rounding is 0.4%, and a few steps of it stay within 2% of the loss.
    # In fp32 (--tiny) the paths compute the same thing and agree to 1e-4.
    comparisons = compare_losses(results, 2e-2 if cuda else 1e-4)
    for line in comparisons:
        verdict = "within" if line["within"] else "OUTSIDE"
        print(f"{line['name']} against {line['against']}: largest relative loss difference "
              f"{line['largest_relative_difference']:.2e} over {line['steps']} steps, {verdict} {line['tolerance']:g}")
    if options.json:
        report = {"environment": environment(device), "flop_per_token": per_token, "spec_peak_tflops": peak,
                  "measured_ceiling_tflops": ceiling, "steps": options.steps, "warmup": options.warmup,
                  "timeout_s": options.timeout, "budget_s": options.budget,
                  "skipped": skipped, "results": results, "loss_comparisons": comparisons}
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written: {options.json}")


if __name__ == "__main__":
    main()
