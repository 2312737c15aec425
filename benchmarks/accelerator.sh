#!/usr/bin/env bash
# Accelerator figures in one short run (< 5 minutes on one GPU): the train step of DDPM++ and
# NCSN++ at nf 128, batch 128 per device, in float32 and bfloat16 (ms, img/s, achieved FLOP/s,
# MFU against the device's peak), fast sampling (dpmpp_2m, 20 steps) in images/s and the ODE
# likelihood in examples/s. See benchmarks/accelerator.py for what each figure is.
#
#   bash benchmarks/accelerator.sh            # on a GPU / TPU machine
#   bash benchmarks/accelerator.sh --tiny     # the same code paths at CPU size (smoke test)
#   bash benchmarks/accelerator.sh --nf 64 --batch 64 --dtypes bfloat16   # any accelerator.py flag
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then  # the project's venv (scripts/setup.sh) when there is one
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# Let XLA take device memory as it needs it: the figures are for one process on the device.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
  --format=csv,noheader || true
exec "$PYTHON" benchmarks/accelerator.py "$@"
