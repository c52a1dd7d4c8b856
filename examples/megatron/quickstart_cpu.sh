#!/usr/bin/env bash
# CPU quickstart: a tiny Megatron GPT trained at TP=2 over two gloo ranks.
# (Interim: the on-policy GKD quickstart replaces this.) Extra arguments go to the
# script, e.g. `--tp 1 --pp 2` or `--sequence-parallel`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
NPROC=${NPROC:-2}
export MEGATRON_OPD_DEVICE=cpu
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    tools/smoke_train.py --tp 2 "$@"
