#!/usr/bin/env bash
# The main job: set up .venv, train a small DDPM++ (VP SDE) on the embedded 8x8 digits, then
# evaluate it (eval loss, bits/dim over the test split, samples and digits FID / KID).
# Extra arguments are passed to both commands, e.g. --config.training.n_iters=500.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
CONFIG=${CONFIG:-configs/digits/vp_ddpmpp_continuous.py}
WORKDIR=${WORKDIR:-workdir/digits_vp_ddpmpp}
.venv/bin/python main.py --config "$CONFIG" --workdir "$WORKDIR" --mode train "$@"
.venv/bin/python main.py --config "$CONFIG" --workdir "$WORKDIR" --mode eval "$@"
echo "Results: $WORKDIR/eval/results.jsonl; samples: $WORKDIR/samples and $WORKDIR/eval"
