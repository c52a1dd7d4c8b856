#!/usr/bin/env bash
# CPU demos of OPD-RL and OPSD on the quickstart's addition task, two gloo ranks at TP=2
# (see megatron_opd/quickstart/demos.py): bash examples/megatron/demo_cpu.sh opd_rl|opsd [args]
# metrics.json (teacher_kl and accuracy, before and after) lands in $OUT.
# multi_teacher: two specialist teachers in one run, each row routed to its task's teacher
# (megatron_opd/quickstart/multi_teacher.py); metrics.json: accuracy per task, before and after.
# Runs from any directory, in it: OUT (default outputs/demo_METHOD) is relative to where you run it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
METHOD=${1:?usage: demo_cpu.sh opd_rl|opsd|multi_teacher [quickstart args] [key=value ...]}
shift
if [[ -x "$root/.venv/bin/python" ]]; then PYTHON=${PYTHON:-$root/.venv/bin/python}; else PYTHON=${PYTHON:-python}; fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
NPROC=${NPROC:-2}
OUT=${OUT:-outputs/demo_$METHOD}
export MEGATRON_OPD_DEVICE=cpu
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
export HF_DATASETS_DISABLE_PROGRESS_BARS=1
if [[ $METHOD == multi_teacher ]]; then
    demo=(-m megatron_opd.quickstart.multi_teacher)
else
    demo=(-m megatron_opd.quickstart.demos --method "$METHOD")
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "${demo[@]}" --out "$OUT" "$@"
