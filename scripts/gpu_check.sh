#!/usr/bin/env bash
# The GPU machine's one prepared command: install the carried stack and this repo, show the machine and
# the versions, then measure plain TRL against every sftkit configuration (scripts/bench_gpu.py).
#
#   ../shared/gpu/fetch_wheels.sh        # here, first: fills ./.whl (trl, datasets, deepspeed, liger-kernel, ...)
#   device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
#                -> $OUT/bench.log (all the benchmark printed) and $OUT/bench.json (table, losses, environment)
#   bash scripts/gpu_check.sh --tiny     # a dry run on a CPU; further arguments go to bench_gpu.py
#
# Time, to end well inside 9 minutes (and the tool's 600 s): installs ~30 s; the benchmark's own set-up
# (a random-weight 0.5B model, a tokenizer and the text) ~30 s; the matrix-product ceiling and the report
# ~10 s: ~70 s. The configurations get --budget 400 s together and at most --timeout 150 s each: seven
# configurations of ~30-60 s each (compile the slowest, and last, so a spent budget costs it alone).
# 70 + 400 = 470 s, under 8 minutes at the worst; what is left of the budget is never exceeded.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}

if [[ " $* " == *" --tiny "* ]]; then
  # A dry run leaves this machine's packages alone: the wheels are built for the GPU machine's Python,
  # and bench_gpu.py's children import this checkout's sftkit without an install.
  echo "--tiny: not installing the carried wheels or this repo; using the packages installed here"
elif [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .  # entry points (plugins) need it
else
  echo "no .whl (../shared/gpu/fetch_wheels.sh fills it): using the packages installed here"
fi

if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "no nvidia-smi on this machine"; fi
python3 - <<'PY'
import importlib.metadata
import sys

import torch

names = ("torch", "transformers", "trl", "datasets", "accelerate", "deepspeed", "liger-kernel", "sftkit")
versions = {}
for name in names:
    try:
        versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        versions[name] = "-"
print(f"python {sys.version.split()[0]};", "; ".join(f"{name} {version}" for name, version in versions.items()))
print(f"CUDA {torch.version.cuda}; GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
PY

PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py --timeout 150 --budget 400 --json "$OUT/bench.json" "$@" 2>&1 \
  | tee "$OUT/bench.log"
echo "written: $OUT/bench.log, $OUT/bench.json"
