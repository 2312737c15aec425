#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite on the CPU (2 workers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/python -m pytest -n 2 -q --durations=15 "$@"
