#!/usr/bin/env bash
# The GPU benchmark as one prepared command: install the wheels brought along, check in a few seconds that
# everything imports, show the machine, then measure plain TRL against sftkit (scripts/bench_gpu.py).
#
#   bash scripts/gpu_check.sh            # on a GPU machine; writes $OUT/bench.log and $OUT/bench.json
#   bash scripts/gpu_check.sh --tiny     # a dry run on a CPU; further arguments go to bench_gpu.py
#
# A GPU machine without a package index gets its missing packages as wheels in $WHEELS (./.whl: trl,
# datasets, deepspeed, liger-kernel and their small dependencies; cut-cross-entropy and ninja are optional
# levers). They are installed into $SITE and put first on PYTHONPATH with this checkout, which is all the
# benchmark needs. The preflight then imports every package it uses and stops at the first missing one;
# an editable install (for plugins' entry points) comes after it, and is skipped where pip refuses it.
#
# Time, to end well inside 8 minutes: installs ~30 s; preflight ~10 s; the benchmark's set-up (a
# random-weight 0.5B model, a tokenizer and the text) ~30 s; the configurations --budget 330 s together
# (the first at most 240 s, others 180 s), most informative first, so a spent budget costs the least;
# the matrix-product ceiling and the report ~10 s. Pass --budget 200 to rerun in less.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
export WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/sftkit-site}

if [[ " $* " == *" --tiny "* ]]; then
  # A dry run leaves this machine's packages alone: the wheels in $WHEELS are built for the GPU machine's Python.
  echo "--tiny: not installing the wheels in $WHEELS; using the packages installed here"
  wheels_installed=no
elif compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check: the wheels in $WHEELS did not install into $SITE (above: why)"; exit 3; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  wheels_installed=yes
else
  echo "gpu_check: no wheels in $WHEELS; using the packages installed here"
  wheels_installed=no
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "no nvidia-smi on this machine"; fi
# Preflight: every package the benchmark imports, one clear line for the first that is missing or broken.
python3 - <<'PY'
import importlib
import importlib.metadata
import os
import sys

for module in ("torch", "transformers", "trl", "datasets", "accelerate", "deepspeed", "sftkit.train"):
    try:
        importlib.import_module(module)
    except Exception as error:  # an import that fails for any reason is the same news: stop here
        sys.exit(f"gpu_check preflight: cannot import {module}: {type(error).__name__}: {error}. "
                 f"Add its wheel to {os.environ['WHEELS']} (with its dependencies) and run again.")
import torch

names = ("torch", "transformers", "trl", "datasets", "accelerate", "deepspeed", "liger-kernel", "cut-cross-entropy",
         "sftkit")
versions = {}
for name in names:
    try:
        versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        versions[name] = "-"
print(f"python {sys.version.split()[0]};", "; ".join(f"{name} {version}" for name, version in versions.items()))
print(f"CUDA {torch.version.cuda}; GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
PY
if [[ $wheels_installed == yes ]]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>/dev/null \
    || echo "gpu_check: no editable install here (pip refused it); this checkout is on PYTHONPATH, which is enough"
fi

PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py --budget 330 --json "$OUT/bench.json" "$@" 2>&1 \
  | tee "$OUT/bench.log"
echo "written: $OUT/bench.log, $OUT/bench.json"
