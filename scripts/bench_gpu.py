"""GPU throughput: sftkit against plain TRL at the same precision and rows per step, in one invocation.

    python scripts/bench_gpu.py [--only sftkit,sftkit_bf16] [--json bench.json] [--budget 330]
    python scripts/bench_gpu.py --tiny                        # every configuration a CPU can run, small
    bash scripts/gpu_check.sh                                 # installs, preflight, then this

Qwen2.5-0.5B's architecture with random weights (throughput does not depend on weight values), text
of log-normal lengths (about 350 tokens at the median) in a byte-level BPE tokenizer trained on it; the
model keeps Qwen2.5's 151,936-row vocabulary, so the LM head costs what it costs there. Every row is
packed into sequences of 1,024 tokens. Plain TRL is handed the packed sequences sftkit trains, in the
order sftkit trains them (``trl_rows``), and reads them in that order: its trainer, collator and model
do the rest, so the two compute on the same batches and their losses compare step for step.

Each configuration runs in its own process and is compared with the one it should beat:
- like for like: sftkit pure bf16 against TRL's best (pure bf16 weights, flex attention); sftkit's
  mixed precision (fp32 master weights, the default) against TRL's mixed precision;
- tokens per micro-step: 64 packed rows per optimizer step taken as 32 or 64 rows a micro-step, against
  TRL's 4 rows a micro-step with 16 accumulation steps (the same optimisation);
- levers: the recipe with one lever changed, against the recipe; the recipe under the DeepSpeed ZeRO-2
  and FSDP2 launcher configs with one process, against the recipe on its own.
Reported: tokens/s between the end of the warm-up and the last step (the clock synchronises the GPU at
those two points only, and nothing is logged between them), MFU, peak memory, and each configuration's
first losses against its comparison's. A configuration that fails or outlasts its time is reported as
failed and the others still run; a comparison that failed leaves absolute numbers only.

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
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import datasets

ROOT = Path(__file__).resolve().parents[1]
SPEC_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
RECIPE = ROOT / "configs" / "recipes" / "qwen2.5-0.5b-infinity-instruct.yaml"
LAUNCHERS = {"zero2": ("deepspeed_zero2.yaml", "cpu/zero2_2proc.yaml"), "fsdp2": ("fsdp2.yaml", None)}


class Schedule(NamedTuple):
    """Packed rows per optimizer step, steps run, and the warm-up before the clock starts (losses logged in it)."""

    rows_per_step: int
    steps: int
    warmup: int


SCHEDULES = {"recipe": Schedule(4, 40, 20), "64 rows": Schedule(64, 12, 4), "launcher": Schedule(4, 20, 10)}
TINY_SCHEDULES = {"recipe": Schedule(4, 8, 4), "64 rows": Schedule(64, 4, 2), "launcher": Schedule(4, 8, 4)}


class Config(NamedTuple):
    """One measured configuration.

    ``tool``: "trl" (plain SFTTrainer) or "sftkit" (the GPU recipe); ``changes``: what differs from the tool's
    own setup; ``against``: the configuration it is compared with; ``on_cpu``: what a CPU (--tiny) runs instead,
    where that differs; ``needs_cuda``: why it cannot run on a CPU at all.
    """

    what: str
    tool: str
    changes: dict[str, Any]
    schedule: str = "recipe"
    against: str | None = None
    launcher: str | None = None
    on_cpu: str = ""
    needs_cuda: str = ""


BF16_ON_CPU = "fp32 on a CPU: the same computation as the one it is compared with"
# Run in this order, the most informative first, so a spent --budget costs the least: the like-for-like
# comparisons, compile, tokens per micro-step, the launchers, then the levers TRL's own table predicts.
CONFIGS = {
    "trl_best": Config("plain TRL's best: pure bf16 weights, flex attention, packing (bfd, padding-free), no "
                       "gradient checkpointing", "trl", {"dtype": "bfloat16", "attention": "flex_attention"},
                       on_cpu="fp32, sdpa"),
    "sftkit_bf16": Config("sftkit's recipe with pure bf16 weights (dtype: bfloat16)", "sftkit", {"dtype": "bfloat16"},
                          against="trl_best", on_cpu="fp32"),
    "trl_mixed": Config("plain TRL in mixed precision (fp32 master weights, bf16 autocast), sdpa, packing, no "
                        "gradient checkpointing", "trl", {"dtype": "float32", "attention": "sdpa"},
                        against="trl_best", on_cpu=BF16_ON_CPU),
    "sftkit": Config(f"sftkit's GPU recipe as a user runs it ({RECIPE.relative_to(ROOT)}): mixed precision, the "
                     "speed levers sftkit chooses on this machine", "sftkit", {}, against="trl_mixed"),
    "sftkit_compile": Config("the recipe with torch_compile: true (each decoder layer compiled, one batch shape)",
                             "sftkit", {"torch_compile": True}, against="sftkit"),
    "trl_64rows": Config("plain TRL's best at 64 packed rows per step: 4 rows a micro-step, 16 accumulation steps",
                         "trl", {"dtype": "bfloat16", "attention": "flex_attention", "gradient_accumulation_steps": 16},
                         schedule="64 rows", on_cpu="fp32, sdpa"),
    "sftkit_64k": Config("sftkit pure bf16 at 64 packed rows per step: 64 rows (65,536 tokens) a micro-step, no "
                         "accumulation", "sftkit", {"dtype": "bfloat16", "per_device_train_batch_size": 64,
                                                    "global_batch_size": 64},
                         schedule="64 rows", against="trl_64rows", on_cpu="fp32"),
    "sftkit_32k": Config("sftkit pure bf16 at 64 packed rows per step: 32 rows (32,768 tokens) a micro-step, 2 "
                         "accumulation steps", "sftkit", {"dtype": "bfloat16", "per_device_train_batch_size": 32,
                                                          "global_batch_size": 64},
                         schedule="64 rows", against="trl_64rows", on_cpu="fp32"),
    "sftkit_zero2": Config("the recipe under configs/accelerate/deepspeed_zero2.yaml, one process", "sftkit", {},
                           schedule="launcher", against="sftkit", launcher="zero2",
                           on_cpu="configs/accelerate/cpu/zero2_2proc.yaml, one process"),
    "sftkit_fsdp2": Config("the recipe under configs/accelerate/fsdp2.yaml, one process", "sftkit", {},
                           schedule="launcher", against="sftkit", launcher="fsdp2",
                           needs_cuda="accelerate runs FSDP2 without sharding on a CPU"),
    "sftkit_flex": Config("the recipe with attn_implementation: flex_attention", "sftkit",
                          {"attn_implementation": "flex_attention"}, against="sftkit", on_cpu="sdpa: " + BF16_ON_CPU),
    "sftkit_head_trl": Config("the recipe with lm_head_loss: trl (TRL's fused head, with its entropy and accuracy)",
                              "sftkit", {"lm_head_loss": "trl"}, against="sftkit",
                              on_cpu="a CPU computes the loss with TRL's head anyway: the same computation"),
    "sftkit_sdpa": Config("the recipe with attn_implementation: sdpa", "sftkit", {"attn_implementation": "sdpa"},
                          against="sftkit", on_cpu="the same computation (a CPU attends with sdpa anyway)"),
    "sftkit_gc": Config("the recipe with gradient_checkpointing: true (what activation recomputation costs)",
                        "sftkit", {"gradient_checkpointing": True}, against="sftkit"),
    "sftkit_liger": Config("the recipe with use_liger_kernel: true (Liger's RMSNorm, SwiGLU and rotary kernels)",
                           "sftkit", {"use_liger_kernel": True}, against="sftkit",
                           needs_cuda="Liger's kernels are Triton, CUDA only"),
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


def max_length(tiny: bool) -> int:
    return 256 if tiny else 1024


def token_lengths(model_dir: Path, data: Path, tiny: bool) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in data.open()]
    return [min(len(ids) + 1, max_length(tiny)) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def trl_rows(model_dir: Path, data: Path, tiny: bool) -> datasets.Dataset:
    """The packed sequences sftkit trains on the bench's rows, in its order (seed 0): each text and EOS, cut to
    max_length, packed by TRL's best-fit decreasing window by window (``sftkit.data.order``)."""
    import datasets
    from transformers import AutoTokenizer

    from sftkit.data.order import in_training_order, pack_in_order

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] + tokenizer.eos_token for line in data.open()]
    ids = [row[:max_length(tiny)] for row in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    rows = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "row": list(range(len(ids)))})
    return pack_in_order(in_training_order(rows, seed=0), max_length(tiny), "bfd").remove_columns("rows")


def flop_per_token(tiny: bool, lengths: list[int]) -> float:
    import torch
    from transformers import Qwen2ForCausalLM

    config = model_config(tiny)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    mean_context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    return 6 * parameters + 12 * config.num_hidden_layers * config.hidden_size * mean_context


class Clock:
    """A TrainerCallback (built lazily, so this module imports without transformers): the time at the end of the
    warm-up and at the last step, the GPU synchronised there only; logs (each one a synchronisation) only in the
    warm-up, where the losses are compared, and at its end and the last step, where the tokens are read."""

    def __new__(cls, marks: dict, schedule: Schedule):
        import torch
        from transformers import TrainerCallback

        def now() -> float:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        class _Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == schedule.warmup:
                    marks["start"] = now()

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == schedule.steps:
                    marks["end"] = now()
                control.should_log = state.global_step <= schedule.warmup or state.global_step == schedule.steps
                return control

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                from accelerate import PartialState
                from torch.distributed.tensor import DTensor

                sharded = any(isinstance(p, DTensor) for p in model.parameters()) if model is not None else False
                kind = PartialState().distributed_type.value
                marks["ran_as"] = ("one process" if kind == "NO" else kind) + (", sharded" if sharded else "")

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "num_tokens" in logs:
                    marks.setdefault("tokens", {})[state.global_step] = float(logs["num_tokens"])
                if logs and "loss" in logs:
                    marks.setdefault("loss", {})[state.global_step] = float(logs["loss"])

        return _Clock()


def run_one(name: str, work: Path, tiny: bool) -> dict:
    import torch

    config = CONFIGS[name]
    schedule = (TINY_SCHEDULES if tiny else SCHEDULES)[config.schedule]
    model_dir, data = build_assets(work, tiny)
    marks: dict = {}
    cuda = torch.cuda.is_available()
    changes = dict(config.changes)
    if not cuda:  # a CPU runs every path in fp32 with sdpa (the table says which configurations that makes alike)
        changes.pop("dtype", None)
        changes.pop("attention", None)
    accumulation = changes.pop("gradient_accumulation_steps", 1)
    common = {"output_dir": str(work / f"out-{name}"), "max_steps": schedule.steps, "logging_steps": 1,
              "report_to": "none", "save_strategy": "no", "learning_rate": 1e-5, "per_device_train_batch_size": 4,
              "max_length": max_length(tiny), "packing": True, "seed": 0, "lr_scheduler_type": "constant",
              "warmup_steps": 0}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if config.tool == "trl":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=changes.get("attention", "sdpa"),
                                                     dtype=getattr(torch, changes.get("dtype", "float32")))
        args = SFTConfig(**common, gradient_accumulation_steps=accumulation, gradient_checkpointing=False, bf16=cuda,
                         use_cpu=not cuda, dataset_kwargs={"skip_prepare_dataset": True},
                         train_sampling_strategy="sequential")
        trainer = SFTTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(model_dir),
                             train_dataset=trl_rows(model_dir, data, tiny), callbacks=[Clock(marks, schedule)])
        trainer.train()
        levers: list[str] = []
    else:
        from sftkit.jobs.train import train
        from sftkit.recipe import read_recipe_file
        from sftkit.setup.resolve import load_recipe

        recipe = read_recipe_file(str(RECIPE))
        recipe.pop("dataset_config")  # the data here is a local text file
        # The speed levers the recipe leaves unset are sftkit's to choose. Every row prepared and packed, as plain
        # TRL does, so that both train on the same packed sequences.
        values = {**recipe, **common, "model_name_or_path": str(model_dir), "dataset_name": str(data),
                  "assistant_only_loss": False, "prepare": "eager", "overwrite_output_dir": True, **changes}
        file = work / f"{name}.yaml"
        file.write_text(json.dumps(values))
        loaded = load_recipe(str(file))
        levers = [note for note in loaded.notes if note.startswith("speed:")]
        train(loaded, callbacks=[Clock(marks, schedule)], save=False)
    tokens = marks["tokens"][schedule.steps] - marks["tokens"][schedule.warmup]
    return {
        "name": name,
        "tokens_per_s": tokens / (marks["end"] - marks["start"]),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "losses": [marks["loss"][step] for step in sorted(marks["loss"]) if step <= schedule.warmup],
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "ran_as": marks.get("ran_as"),
        "levers": levers,
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


def child_command(name: str, options: argparse.Namespace, cuda: bool) -> list[str]:
    """This script for one configuration; under ``accelerate launch`` with its launcher config, one process."""
    own = [__file__, "--run", name, "--workdir", str(options.workdir), *(["--tiny"] if options.tiny else [])]
    launcher = CONFIGS[name].launcher
    if launcher is None:
        return [sys.executable, *own]
    gpu_file, cpu_file = LAUNCHERS[launcher]
    config_file = ROOT / "configs" / "accelerate" / (gpu_file if cuda else cpu_file)
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--num_processes", "1", "--main_process_port", "0", *own]


def run_child(name: str, options: argparse.Namespace, limit: float, cuda: bool) -> dict:
    """One configuration in its own process group: a crash or a hang stays there, and its workers end with it."""
    # The children import this checkout's sftkit, whether or where it is installed.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    child = subprocess.Popen(child_command(name, options, cuda), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": path},
                             start_new_session=True)
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
    """Each configuration's logged losses against those of the configuration it is compared with."""
    comparisons = []
    for name, result in results.items():
        against = CONFIGS[name].against
        if against is None or "losses" not in result or "losses" not in results.get(against, {}):
            continue
        steps = list(zip(result["losses"], results[against]["losses"], strict=False))
        worst = max(abs(a - b) / abs(b) for a, b in steps)
        comparisons.append({"name": name, "against": against, "steps": len(steps),
                            "largest_relative_difference": worst, "tolerance": tolerance,
                            "within": worst <= tolerance})
    return comparisons


def environment(device: str) -> dict:
    """What the numbers were measured on: they differ between cards, versions and runs."""
    import torch

    versions = {}
    for package in ("torch", "transformers", "trl", "accelerate", "datasets", "deepspeed", "liger-kernel",
                    "cut-cross-entropy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"device": device, "cuda": torch.version.cuda, "python": sys.version.split()[0], **versions,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def report(results: dict[str, dict], per_token: float, ceiling: float | None, cuda: bool) -> list[dict]:
    """Print the table, the levers each sftkit run chose, the losses and their comparisons; return the latter."""
    device = next((result["device"] for result in results.values() if "device" in result), "-")
    peak = next((value for key, value in SPEC_PEAK_TFLOPS.items() if key in device), None)
    print(f"\n{device}; FLOP per token {per_token / 1e9:.2f} G; spec peak {peak or '-'} TFLOP/s; "
          f"measured bf16 ceiling {f'{ceiling:.0f}' if ceiling else '-'} TFLOP/s")
    print("| configuration | compared with | tokens/s | ratio | MFU | of ceiling | peak GiB | peak ratio | wall s |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        against = CONFIGS[name].against
        base = results.get(against or "", {})
        if "failed" in result:
            print(f"| {name} | {against or '-'} | failed ({result['failed'].splitlines()[0]}) | - | - | - | - | - | "
                  f"{result['wall_s']} |")
            continue
        achieved = result["tokens_per_s"] * per_token / 1e12
        result.update(tflops=achieved, mfu=achieved / peak if peak else None,
                      of_ceiling=achieved / ceiling if ceiling else None,
                      ratio=result["tokens_per_s"] / base["tokens_per_s"] if "tokens_per_s" in base else None)
        peak_ratio = (result["peak_gib"] / base["peak_gib"]) if result["peak_gib"] and base.get("peak_gib") else None
        cells = [f"{result['tokens_per_s']:,.0f}", f"{result['ratio']:.2f}x" if result["ratio"] else "-",
                 f"{result['mfu']:.1%}" if result["mfu"] is not None else "-",
                 f"{result['of_ceiling']:.1%}" if result["of_ceiling"] is not None else "-",
                 f"{result['peak_gib']:.1f}" if result["peak_gib"] is not None else "-",
                 f"{peak_ratio:.2f}x" if peak_ratio else "-", str(result["wall_s"])]
        print(f"| {name} | {against or '-'} | " + " | ".join(cells) + " |")
    if not cuda:
        print("\non a CPU (fp32, sdpa): " + "; ".join(f"{name}: {CONFIGS[name].on_cpu}" for name in results
                                                       if CONFIGS[name].on_cpu))
    print("\nwhat each sftkit configuration ran with:")
    for name, result in results.items():
        if CONFIGS[name].tool == "sftkit" and "ran_as" in result:
            print(f"{name:16} {result['ran_as']}; " + "; ".join(lever.removeprefix("speed: ")
                                                              for lever in result["levers"]))
    print("\nlosses logged in the warm-up:")
    for name, result in results.items():
        if "losses" in result:
            print(f"{name:16} " + " ".join(f"{loss:.3f}" for loss in result["losses"]))
    # bf16 keeps 8 bits of mantissa: one rounding is 0.4%, and a few steps of it stay within 2% of the loss.
    # In fp32 (--tiny) the paths compute the same thing and agree to 1e-4.
    comparisons = compare_losses(results, 2e-2 if cuda else 1e-4)
    for line in comparisons:
        verdict = "within" if line["within"] else "OUTSIDE"
        print(f"{line['name']} against {line['against']}: largest relative loss difference "
              f"{line['largest_relative_difference']:.2e} over {line['steps']} steps, {verdict} {line['tolerance']:g}")
    return comparisons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a toy model on the CPU: checks every path that runs")
    parser.add_argument("--only", type=lambda text: text.split(","), default=list(CONFIGS),
                        help=f"configurations to run, comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--timeout", type=float, default=180, help="seconds one configuration may take (failed after)")
    parser.add_argument("--first-timeout", type=float, default=240,
                        help="seconds the first configuration may take: it also compiles flex attention's kernels "
                             "into the shared cache and warms the file cache")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds all configurations may take together; each is given what is left, at most "
                             "its timeout, and one reached with nothing left is reported as not run")
    parser.add_argument("--json", type=Path, help="also write the table, losses and environment here")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sftkit-bench-gpu")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one configuration, in a child process
    options = parser.parse_args()
    if unknown := sorted(set(options.only) - set(CONFIGS)):
        parser.error(f"unknown configuration {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    work = options.workdir / ("tiny" if options.tiny else "full")
    work.mkdir(parents=True, exist_ok=True)
    if options.run:
        result = run_one(options.run, work, options.tiny)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # a terminated benchmark ends its child too
    cuda = torch.cuda.is_available()
    selected = [name for name in CONFIGS if name in options.only]
    skipped = {name: CONFIGS[name].needs_cuda for name in selected if CONFIGS[name].needs_cuda and not cuda}
    if skipped:
        print("skipped on this machine (no CUDA GPU): " + "; ".join(f"{name} ({why})" for name, why in skipped.items()))
    lengths = token_lengths(*build_assets(work, options.tiny), options.tiny)
    results: dict[str, dict] = {}
    deadline = time.monotonic() + options.budget if options.budget is not None else None
    for index, name in enumerate(name for name in selected if name not in skipped):
        timeout = options.first_timeout if index == 0 else options.timeout
        left = deadline - time.monotonic() if deadline is not None else timeout
        if left < 1:
            results[name] = {"name": name, "failed": "not run: --budget spent", "wall_s": 0.0}
            print(f"{name} failed: not run: --budget spent", flush=True)
            continue
        print(f"running {name}: {CONFIGS[name].what}", flush=True)
        started = time.monotonic()
        results[name] = run_child(name, options, min(timeout, left), cuda)
        results[name]["wall_s"] = round(time.monotonic() - started, 1)
        if "failed" in results[name]:
            print(f"{name} failed: {results[name]['failed']}", flush=True)

    per_token = flop_per_token(options.tiny, lengths)
    ceiling = matmul_ceiling_tflops()
    comparisons = report(results, per_token, ceiling, cuda)
    if options.json:
        device = next((result["device"] for result in results.values() if "device" in result), "-")
        written = {"environment": environment(device), "flop_per_token": per_token,
                   "spec_peak_tflops": next((v for k, v in SPEC_PEAK_TFLOPS.items() if k in device), None),
                   "measured_ceiling_tflops": ceiling,
                   "schedules": {name: schedule._asdict() for name, schedule in
                                 (TINY_SCHEDULES if options.tiny else SCHEDULES).items()},
                   "configurations": {name: CONFIGS[name]._asdict() for name in selected},
                   "timeout_s": options.timeout, "budget_s": options.budget, "skipped": skipped,
                   "results": results, "loss_comparisons": comparisons}
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(written, indent=2) + "\n")
        print(f"written: {options.json}")


if __name__ == "__main__":
    main()
