#!/usr/bin/env bash
# CPU demos of OPD-RL and OPSD on the quickstart's addition task, two gloo ranks at TP=2
# (see megatron_opd/quickstart/demos.py): bash examples/megatron/demo_cpu.sh opd_rl|opsd [args]
# metrics.json (teacher_kl and accuracy, before and after) lands in $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
METHOD=${1:?usage: demo_cpu.sh opd_rl|opsd [quickstart args] [key=value ...]}
shift
PYTHON=${PYTHON:-.venv/bin/python}
NPROC=${NPROC:-2}
OUT=${OUT:-outputs/demo_$METHOD}
export MEGATRON_OPD_DEVICE=cpu
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
export HF_DATASETS_DISABLE_PROGRESS_BARS=1
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m megatron_opd.quickstart.demos --method "$METHOD" --out "$OUT" "$@"
