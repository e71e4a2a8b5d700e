"""Time to the first optimizer step and data-preparation throughput: sftkit against plain TRL, same run.

    python scripts/bench_prepare.py [--rows 200000] [--workdir /tmp/sftkit-bench] [--packed | --scale]

Builds an Infinity-Instruct-shaped dataset (raw human/gpt rows, ~1.9 KB each) and a byte-level BPE
tokenizer of realistic size (32k, Qwen2.5's ChatML template), then measures, each in a fresh
process with a warm datasets cache (both tools read the same Arrow files):
  - seconds from launch to the first optimizer step, plain TRL (roles mapped beforehand, as the
    walkthrough had to) and sftkit on the raw rows, at N and at N/100 rows;
  - sftkit's second start with a warm preparation cache (an epoch run, eager preparation);
  - full-epoch preparation throughput against the raw batched tokenizer on the same cores.
With --packed, only this instead: seconds to the first step of a bounded packed run (max_steps 20,
4 packed rows of 1,024 tokens a step), plain TRL against sftkit, at N rows.
With --scale, only this instead: seconds to the first step and the peak resident memory at it of sftkit's
bounded lazy run and of the same run streamed (max_steps 1; the median of three runs each), at 2,000,
200,000 and 2,000,000 rows, plain TRL beside them where it can finish within 20 minutes (--rows is ignored).
The model is the embedded tiny one with one row per step, so the times are data preparation and start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYLLABLES = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"] + ["an", "er", "in", "on", "ul", "ey"]
SCALE_ROWS = (2_000, 200_000, 2_000_000)
# sftkit's runs at each size: (label, extra recipe arguments); another way through the data is one more line.
SCALE_VARIANTS: list[tuple[str, list[str]]] = [("lazy", []), ("streamed", ["--dataset_streaming", "true"])]
SFTKIT_REPEATS = 3  # a run of seconds on a busy machine is noisy: the median of three, time and memory
TRL_CAP_MINUTES = 20  # plain TRL prepares every row before step 1: at some size it cannot finish in reasonable time

FIRST_STEP = """
import sys, time
from transformers import TrainerCallback
def peak_rss_kib():  # this process's own peak (Linux); ru_maxrss reports the launching process's over exec
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print(f"FIRST_STEP {time.time()} {peak_rss_kib()}", flush=True); control.should_training_stop = True
"""
SFTKIT_SCRIPT = FIRST_STEP + """
from sftkit.cli import build_parser
from sftkit.values import parse_overrides
from sftkit.setup.resolve import load_recipe
from sftkit.jobs.train import train
options, rest = build_parser().parse_known_args(["train", *sys.argv[1:]])
train(load_recipe(options.config, parse_overrides(rest)), callbacks=[FirstStep()])
"""
TRL_SCRIPT = FIRST_STEP + """
import datasets
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer
rows = datasets.load_dataset("json", data_files=sys.argv[1], split="train")
rows = rows.map(lambda r: {"messages": [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                                        for t in r["conversations"]]}, remove_columns=rows.column_names)
packing = {"packing": True, "per_device_train_batch_size": 4, "max_steps": 20} if len(sys.argv) > 5 else {}
args = SFTConfig(output_dir=sys.argv[3], **{"max_steps": 1, "per_device_train_batch_size": 1, **packing}, bf16=False,
                 use_cpu=True, gradient_checkpointing=False, report_to="none", max_length=1024, save_strategy="no")
SFTTrainer(model=sys.argv[2], args=args, train_dataset=rows, processing_class=AutoTokenizer.from_pretrained(sys.argv[4]),
           callbacks=[FirstStep()]).train()
"""


def words(rng: random.Random, count: int) -> str:
    return " ".join("".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(count))


def build_rows(path: Path, count: int) -> None:
    """Infinity-Instruct's schema; two turns of ~1.9 KB in all, deterministic."""
    rng = random.Random(0)
    with path.open("w") as file:
        for index in range(count):
            turns = [{"from": "human", "value": words(rng, 60)}, {"from": "gpt", "value": words(rng, 260)}]
            file.write(json.dumps({"id": index, "conversations": turns, "label": {"ability_en": ["writing"]},
                                   "langdetect": "en", "source": "bench"}) + "\n")


def build_tokenizer(folder: Path, sample: Path) -> None:
    """A 32k byte-level BPE with Qwen2.5's chat template: a realistic cost per token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = Path(__import__("trl").__file__).parent / "chat_templates" / "qwen2_5.jinja"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = sample.read_text().splitlines()[:20000]
    tokenizer.train_from_iterator((json.loads(line)["conversations"][1]["value"] for line in lines), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=special[1:])
    fast.chat_template = base.read_text()
    fast.save_pretrained(folder)


def clear_map_caches(env: dict[str, str]) -> None:
    """Forget every ``datasets.map`` result (both tools would reuse their own), keep the loaded Arrow files."""
    for path in Path(env["HF_DATASETS_CACHE"]).rglob("cache-*.arrow"):
        path.unlink()


@dataclass(frozen=True)
class FirstStep:
    """What a run cost up to the end of its first optimizer step: wall time, and its process's peak RSS then."""

    seconds: float
    peak_rss_mib: float


def first_step(command: list[str], env: dict[str, str], timeout: float | None = None) -> FirstStep:
    """Launch ``command`` with cold map caches and read its first step's mark; raises ``subprocess.TimeoutExpired``
    (the child killed) when it runs past ``timeout`` seconds."""
    clear_map_caches(env)
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False, timeout=timeout)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    mark = next(line for line in result.stdout.splitlines() if line.startswith("FIRST_STEP ")).split()
    return FirstStep(float(mark[1]) - start, int(mark[2]) / 1024)


def timed(command: list[str], env: dict[str, str]) -> float:
    """Seconds from launching ``command`` to the end of its first optimizer step, with cold map caches."""
    return first_step(command, env).seconds


def sftkit_command(data: Path, model: str, output: Path, *extra: str) -> list[str]:
    """A bounded sftkit run on the raw rows (max_steps 1 unless ``extra`` says otherwise), its recipe written
    beside ``output``."""
    recipe = output.with_suffix(".yaml")
    recipe.write_text(json.dumps({
        "model_name_or_path": model, "dataset_name": str(data), "output_dir": str(output), "max_steps": 1,
        "per_device_train_batch_size": 1, "max_length": 1024, "gradient_checkpointing": False, "report_to": "none",
        "save_strategy": "no", "overwrite_output_dir": True,
    }))
    return [sys.executable, str(output.parent / "sftkit_first_step.py"), "--config", str(recipe), *extra]


def sftkit_run(data: Path, model: str, tokenizer: Path, output: Path, env: dict[str, str], *extra: str) -> float:
    """Seconds to the first step of a bounded sftkit run (``sftkit_command``)."""
    return timed(sftkit_command(data, model, output, *extra), env)


def packed_first_steps(data: Path, model_dir: Path, tokenizer_dir: Path, work: Path, env: dict[str, str],
                       trl_script: Path) -> None:
    """A bounded packed run: TRL prepares and packs every row first; sftkit prepares the rows the run packs."""
    print("timing plain TRL, packed ...", flush=True)
    trl = timed([sys.executable, str(trl_script), str(data), str(model_dir), str(work / "trl-out"), str(tokenizer_dir),
                 "packed"], env)
    print("timing sftkit, packed ...", flush=True)
    sftkit = sftkit_run(data, str(model_dir), tokenizer_dir, work / "sftkit-packed", env, "--packing", "true",
                        "--max_steps", "20", "--per_device_train_batch_size", "4")
    print(f"\n| measure ({os.cpu_count()} cores) | plain TRL | sftkit | ratio |\n|---|---:|---:|---:|")
    print(f"| seconds to first step, {int(data.stem.split('-')[-1]):,} rows, packed, max_steps 20 | {trl:.1f} | {sftkit:.1f} "
          f"| {trl / sftkit:.1f}x faster |")


def ensure_rows(path: Path, count: int) -> None:
    """The rows, built once per workdir (2,000,000 take minutes); written aside first, so a build cut short is not
    taken for the data next time."""
    if path.exists():
        return
    print(f"building {count:,} rows ...", flush=True)
    partial = path.with_suffix(".partial")
    build_rows(partial, count)
    partial.rename(path)


def build_tools(work: Path, sample: Path) -> tuple[Path, Path, Path]:
    """The 32k tokenizer, the embedded model resized to it (both once per workdir) and the children's scripts:
    returns the tokenizer's folder, the model's, and plain TRL's script."""
    tokenizer_dir = work / "tokenizer-32k"
    if not tokenizer_dir.exists():
        print("training a 32k BPE tokenizer ...", flush=True)
        build_tokenizer(tokenizer_dir, sample)
    # The embedded model, resized once to the 32k tokenizer so that both tools can feed it; its steps take milliseconds.
    model_dir = work / "tiny-qwen2-32k"
    if not model_dir.exists():
        from transformers import AutoModelForCausalLM

        tiny = AutoModelForCausalLM.from_pretrained(str(ROOT / "sftkit" / "embedded" / "tiny-qwen2"))
        tiny.resize_token_embeddings(32000)
        tiny.save_pretrained(model_dir)
        shutil.copytree(tokenizer_dir, model_dir, dirs_exist_ok=True)
    trl_script = work / "trl_first_step.py"
    trl_script.write_text(TRL_SCRIPT)
    (work / "sftkit_first_step.py").write_text(SFTKIT_SCRIPT)
    return tokenizer_dir, model_dir, trl_script


def warm_datasets_cache(path: Path, env: dict[str, str]) -> None:
    """Convert the JSON rows to Arrow once in the ``datasets`` cache that plain TRL reads."""
    import datasets

    datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=env["HF_DATASETS_CACHE"])


def warm_sftkit_source(path: Path, env: dict[str, str]) -> None:
    """Convert the JSON rows to Arrow once in sftkit's own source cache (under ``$SFTKIT_CACHE``, keyed by the file's
    content), so that a timed run reads Arrow, not JSON; in a child, with the timed runs' environment."""
    load = "import sys; from sftkit.data.sources import load_raw; load_raw(sys.argv[1], None)"
    subprocess.run([sys.executable, "-c", load, str(path)], env=env, cwd=ROOT, check=True, capture_output=True)


def clear_sftkit_preparation(env: dict[str, str]) -> None:
    """Forget the rows sftkit prepared (a lazy run caches its checked sample) and the map caches beside its sources;
    keep the sources' Arrow files."""
    cache = Path(env["SFTKIT_CACHE"])
    shutil.rmtree(cache / "prepared", ignore_errors=True)
    for path in (cache / "sources").rglob("cache-*.arrow"):
        path.unlink()


def scale(work: Path) -> None:
    """sftkit's bounded runs at 2,000 to 2,000,000 rows, whose first step should cost the same time and memory at
    any size, beside plain TRL, which prepares every row first, where it can finish within TRL_CAP_MINUTES."""
    import yaml

    paths = {count: work / f"rows-{count}.jsonl" for count in SCALE_ROWS}
    for count, path in paths.items():
        ensure_rows(path, count)
    tokenizer_dir, model_dir, trl_script = build_tools(work, paths[SCALE_ROWS[1]])  # its first 20,000 rows train it
    # One sftkit cache for every invocation: 2,000,000 rows are converted to Arrow once, not at every run.
    env = {**os.environ, "SFTKIT_CACHE": str(work / "sftkit-cache"), "HF_DATASETS_CACHE": str(work / "hf-datasets")}
    cap = TRL_CAP_MINUTES * 60
    first_seconds: dict[str, float] = {}
    # Plain TRL's seconds a row beyond sftkit's time (the start both pay), at the last size it ran: a hopeless size
    # is skipped.
    trl_rate, trl_rate_rows = 0.0, 0
    table = []
    for count, path in paths.items():
        print(f"warming sftkit's Arrow cache at {count:,} rows ...", flush=True)
        warm_sftkit_source(path, env)
        cells, seconds = [f"{count:,}"], {}
        for label, extra in SCALE_VARIANTS:
            print(f"timing sftkit {label} at {count:,} rows, {SFTKIT_REPEATS} times ...", flush=True)
            output, runs = work / f"sftkit-scale-{label}", []
            for _ in range(SFTKIT_REPEATS):
                clear_sftkit_preparation(env)  # the lazy run's checked sample is prepared anew each time
                runs.append(first_step(sftkit_command(path, str(model_dir), output, *extra), env))
                record = yaml.safe_load((output / "sftkit_run.yaml").read_text())
                print(f"  {runs[-1].seconds:.1f} s, peak RSS {runs[-1].peak_rss_mib:,.0f} MiB; preparation: "
                      f"{record['data']['preparation']}", flush=True)
            sftkit = FirstStep(statistics.median(run.seconds for run in runs),
                               statistics.median(run.peak_rss_mib for run in runs))
            seconds[label] = sftkit.seconds
            first_seconds.setdefault(label, sftkit.seconds)
            cells += [f"{sftkit.seconds:.1f}", f"{sftkit.seconds / first_seconds[label]:.2f}x",
                      f"{sftkit.peak_rss_mib:,.0f}"]
        reference = seconds[SCALE_VARIANTS[0][0]]
        expected = reference + trl_rate * count
        if expected > 2 * cap:  # obviously hopeless: not worth the cap's minutes
            cells += [f"not run: ~{expected / 60:.0f} min expected from the {trl_rate_rows:,}-row rate", "", ""]
        else:
            print(f"timing plain TRL at {count:,} rows (at most {TRL_CAP_MINUTES} min) ...", flush=True)
            warm_datasets_cache(path, env)
            try:
                trl = first_step([sys.executable, str(trl_script), str(path), str(model_dir), str(work / "trl-out"),
                                  str(tokenizer_dir)], env, timeout=cap)
                print(f"  {trl.seconds:.1f} s, peak RSS {trl.peak_rss_mib:,.0f} MiB", flush=True)
                trl_rate, trl_rate_rows = max(trl.seconds - reference, 0) / count, count
                cells += [f"{trl.seconds:.1f}", f"{trl.peak_rss_mib:,.0f}", f"{trl.seconds / reference:.1f}x"]
            except subprocess.TimeoutExpired:
                trl_rate, trl_rate_rows = cap / count, count
                cells += [f"did not finish in {TRL_CAP_MINUTES} min", "", ""]
        table.append(cells)

    header = ["rows"]
    for label, _ in SCALE_VARIANTS:
        header += [f"sftkit {label}: first step s", f"ratio to {SCALE_ROWS[0]:,} rows", "peak RSS MiB"]
    header += ["plain TRL: first step s", "plain TRL: peak RSS MiB", f"TRL / sftkit {SCALE_VARIANTS[0][0]}"]
    print(f"\n{os.cpu_count()} cores")
    print("| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1))
    for cells in table:
        print("| " + " | ".join(cells) + " |")


def raw_tokenizer_rate(data: Path, tokenizer_dir: Path, rows: int) -> float:
    """Rows/s of the tokenizer alone, batched, on the rendered conversations, all cores."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    roles = {"human": "user", "gpt": "assistant"}
    with data.open() as file:
        conversations = [[{"role": roles[t["from"]], "content": t["value"]} for t in json.loads(line)["conversations"]]
                         for line in file]
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    start = time.perf_counter()
    for offset in range(0, len(texts), 1000):
        tokenizer(texts[offset:offset + 1000], add_special_tokens=False)
    return rows / (time.perf_counter() - start)


def sftkit_epoch_rate(data: Path, tokenizer_dir: Path, rows: int, output: Path) -> float:
    """Rows/s of sftkit's full eager preparation (adapt, render, tokenize, mask, policy), cold cache."""
    from sftkit.data.preparation import prepare_data
    from sftkit.setup.resolve import load_recipe
    from sftkit.train.model import load_tokenizer

    recipe_path = output.with_suffix(".yaml")
    recipe_path.write_text(json.dumps({
        "model_name_or_path": str(tokenizer_dir), "dataset_name": str(data), "output_dir": str(output),
        "max_length": 1024, "prepare": "eager", "num_train_epochs": 1,
    }))
    recipe = load_recipe(str(recipe_path))
    tokenizer = load_tokenizer(recipe)
    start = time.perf_counter()
    prepare_data(recipe, tokenizer)
    return rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sftkit-bench")
    parser.add_argument("--packed", action="store_true", help="only the first step of a bounded packed run")
    parser.add_argument("--scale", action="store_true",
                        help="only sftkit's bounded lazy run (first step: time, peak RSS), 2,000 to 2,000,000 rows")
    parser.add_argument("--raw-rate", action="store_true", help=argparse.SUPPRESS)  # child: the tokenizer alone
    parser.add_argument("--epoch-rate", action="store_true", help=argparse.SUPPRESS)  # child: sftkit's eager pass
    options = parser.parse_args()
    work = options.workdir
    if options.raw_rate:
        print(raw_tokenizer_rate(work / f"rows-{options.rows}.jsonl", work / "tokenizer-32k", options.rows))
        return
    if options.epoch_rate:
        print(sftkit_epoch_rate(work / f"rows-{options.rows}.jsonl", work / "tiny-qwen2-32k", options.rows,
                                work / "sftkit-rate"))
        return
    work.mkdir(parents=True, exist_ok=True)
    if options.scale:
        scale(work)
        return
    small_rows = max(options.rows // 100, 64)
    big, small = work / f"rows-{options.rows}.jsonl", work / f"rows-{small_rows}.jsonl"
    for path, count in ((big, options.rows), (small, small_rows)):
        ensure_rows(path, count)
    tokenizer_dir, model_dir, trl_script = build_tools(work, big)
    env = {**os.environ, "SFTKIT_CACHE": str(work / f"cache-{time.time()}"), "HF_DATASETS_CACHE": str(work / "hf-datasets")}
    for path in (big, small):  # warm the Arrow caches both tools read from
        warm_datasets_cache(path, env)
        warm_sftkit_source(path, env)

    results: dict[str, float] = {}
    if options.packed:
        packed_first_steps(big, model_dir, tokenizer_dir, work, env, trl_script)
        return
    print("measuring the raw tokenizer ...", flush=True)  # first, in a process that has not forked yet
    raw = subprocess.run([sys.executable, __file__, "--raw-rate", "--rows", str(options.rows), "--workdir", str(work)],
                         capture_output=True, text=True, check=True)
    raw_rate = float(raw.stdout.split()[-1])
    for label, path in ((f"{options.rows:,}", big), (f"{small_rows:,}", small)):
        print(f"timing plain TRL at {label} rows ...", flush=True)
        results[f"trl {label}"] = timed([sys.executable, str(trl_script), str(path), str(model_dir),
                                         str(work / "trl-out"), str(tokenizer_dir)], env)
        print(f"timing sftkit at {label} rows ...", flush=True)
        results[f"sftkit {label}"] = sftkit_run(path, str(model_dir), tokenizer_dir, work / "sftkit-out", env)
    print("timing sftkit epoch run: cold, then warm cache ...", flush=True)
    epoch = ("--prepare", "eager")
    results["sftkit eager cold"] = sftkit_run(big, str(model_dir), tokenizer_dir, work / "sftkit-epoch", env, *epoch)
    results["sftkit eager warm"] = sftkit_run(big, str(model_dir), tokenizer_dir, work / "sftkit-epoch", env, *epoch)
    print("measuring throughput ...", flush=True)
    clear_map_caches(env)  # in a child, so that the datasets cache it reads is the one just cleared
    rate = subprocess.run([sys.executable, __file__, "--epoch-rate", "--rows", str(options.rows), "--workdir", str(work)],
                          capture_output=True, text=True, check=True,
                          env={**env, "SFTKIT_CACHE": str(work / f"cache-{time.time()}")})
    prepare_rate = float(rate.stdout.split()[-1])

    n, m = f"{options.rows:,}", f"{small_rows:,}"
    print(f"\n| measure ({os.cpu_count()} cores) | plain TRL | sftkit | ratio |\n|---|---:|---:|---:|")
    print(f"| seconds to first step, {n} rows | {results[f'trl {n}']:.1f} | {results[f'sftkit {n}']:.1f} | "
          f"{results[f'trl {n}'] / results[f'sftkit {n}']:.1f}x faster |")
    print(f"| seconds to first step, {m} rows | {results[f'trl {m}']:.1f} | {results[f'sftkit {m}']:.1f} | "
          f"{results[f'trl {m}'] / results[f'sftkit {m}']:.1f}x faster |")
    print(f"| sftkit at {n} rows against sftkit at {m} rows | | | "
          f"{results[f'sftkit {n}'] / results[f'sftkit {m}']:.2f}x the time |")
    print(f"| epoch run, seconds to first step: cold cache / warm cache | | {results['sftkit eager cold']:.1f} / "
          f"{results['sftkit eager warm']:.1f} | |")
    print(f"| full-epoch preparation, rows/s (raw batched tokenizer: {raw_rate:,.0f}) | | {prepare_rate:,.0f} | "
          f"{prepare_rate / raw_rate:.0%} of the tokenizer |")


if __name__ == "__main__":
    main()
