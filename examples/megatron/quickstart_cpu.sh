#!/usr/bin/env bash
# CPU quickstart on two gloo ranks at TP=2 (see megatron_opd/quickstart/run.py): from one
# warmed-up student, the same steps on the same 500 prompts of SFT, off-policy KD (lmbda 0),
# on-policy GKD (lmbda 0.5, configs/quickstart_cpu.yaml) and prompts-only on-policy
# distillation (lmbda 1) from the shipped teacher; a table, metrics.json with the curves and
# quickstart.png (with matplotlib) land in $OUT.
# Extra arguments go to the quickstart, e.g. `--arms sft,gkd training.train_iters=300`.
# Runs from any directory, in it: OUT (default outputs/quickstart) is relative to where you run it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
if [[ -x "$root/.venv/bin/python" ]]; then PYTHON=${PYTHON:-$root/.venv/bin/python}; else PYTHON=${PYTHON:-python}; fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
NPROC=${NPROC:-2}
OUT=${OUT:-outputs/quickstart}
export MEGATRON_OPD_DEVICE=cpu
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
export HF_DATASETS_DISABLE_PROGRESS_BARS=1
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m megatron_opd.quickstart --out "$OUT" "$@"
