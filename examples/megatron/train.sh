#!/usr/bin/env bash
# Any algorithm (the config's `algorithm:`) with torchrun:
#   bash examples/megatron/train.sh CONFIG.yaml [key=value ...]
# gkd.sh, opd_rl.sh and opsd.sh call this with their recipe as the default CONFIG.
#
# Environment (all optional):
#   NPROC        processes per node (default: the GPUs CUDA_VISIBLE_DEVICES names, else all GPUs;
#                2 on CPU)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (default: one node)
#   TP, PP       tensor / pipeline parallel sizes, override the config
#   MODEL, TEACHER, DATA, OUTPUT_DIR             paths, override the config
#   PYTHON       interpreter (default .venv/bin/python when present)
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${1:?usage: train.sh CONFIG.yaml [key=value ...]}
shift
if [[ -x .venv/bin/python ]]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python}; fi
# The GPUs this job may use: those CUDA_VISIBLE_DEVICES names when it is set (empty: none),
# else every GPU nvidia-smi lists.
visible_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        tr ',' '\n' <<<"${CUDA_VISIBLE_DEVICES//[[:space:]]/}" | grep -c . || true
    else
        nvidia-smi --list-gpus 2>/dev/null | grep -c . || true
    fi
}
gpus=0
command -v nvidia-smi >/dev/null 2>&1 && gpus=$(visible_gpus)
if (( gpus > 0 )); then
    NPROC=${NPROC:-$gpus}
else
    NPROC=${NPROC:-2}
    export MEGATRON_OPD_DEVICE=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
NNODES=${NNODES:-1}
overrides=()
[[ -n "${TP:-}" ]] && overrides+=("parallel.tensor_model_parallel_size=$TP")
[[ -n "${PP:-}" ]] && overrides+=("parallel.pipeline_model_parallel_size=$PP")
[[ -n "${MODEL:-}" ]] && overrides+=("model=$MODEL")
[[ -n "${TEACHER:-}" ]] && overrides+=("teacher_model=$TEACHER")
[[ -n "${DATA:-}" ]] && overrides+=("data.dataset=[$DATA]")
[[ -n "${OUTPUT_DIR:-}" ]] && overrides+=("training.output_dir=$OUTPUT_DIR")
if [[ "$NNODES" == 1 ]]; then
    rendezvous=(--standalone)
else
    rendezvous=(--nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}"
                --master-addr "${MASTER_ADDR:?set MASTER_ADDR}" --master-port "${MASTER_PORT:-29500}")
fi
exec "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc-per-node "$NPROC" \
    -m megatron_opd.train --config "$CONFIG" "${overrides[@]}" "$@"
