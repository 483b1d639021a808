#!/usr/bin/env bash
# One prepared GPU call (issue 17): at most ~8 minutes, JSON + Markdown figures in $OUT.
# On the device machine: wheels carried in .whl/ (ott-jax, ml_collections, grain, ...) are
# installed to /tmp/site first; the image's own jax, flax, optax, orbax are used.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# Leave XLA's default preallocation (75 %) alone: the figures are of one process on a whole GPU.
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
timeout 450 python3 benchmarks/device_check.py --out "$OUT" --budget_s "${BUDGET_S:-330}" \
    2>&1 | tee "$OUT/device_check.log"
