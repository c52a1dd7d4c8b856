#!/usr/bin/env bash
# Any algorithm (the config's `algorithm:`) with torchrun:
#   bash examples/megatron/train.sh CONFIG.yaml [key=value ...]
# gkd.sh, opd_rl.sh and opsd.sh call this with their recipe as the default CONFIG.
#
# Run it from any directory: it stays there, so every relative path (CONFIG, key=value
# overrides, the variables below, the recipe's own output_dir) is relative to where you
# stand. CONFIG is looked for there first, then in the repository (configs/X.yaml works from
# anywhere). MODEL, TEACHER and DATA (comma-separated files) are made absolute when they exist
# there (anything else, e.g. TEACHER=null, passes as it is), OUTPUT_DIR always.
#
# Environment (all optional):
#   NPROC        processes per node (default: the GPUs CUDA_VISIBLE_DEVICES names, else all GPUs;
#                2 on CPU)
#   NNODES       nodes (default 1: torchrun --standalone). Above 1, run this once per node with
#                the same NNODES, MASTER_ADDR, MASTER_PORT and each node's NODE_RANK:
#   NODE_RANK    this node, 0 .. NNODES-1 (required when NNODES > 1)
#   MASTER_ADDR  the address of the node with NODE_RANK=0 (required when NNODES > 1)
#   MASTER_PORT  a free port there (default 29500)
#   TP, PP       tensor / pipeline parallel sizes, override the config
#   MODEL, TEACHER, DATA, OUTPUT_DIR             paths, override the config
#   PYTHON       interpreter (default: the repository's .venv/bin/python when present, else python)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
CONFIG=${1:?usage: train.sh CONFIG.yaml [key=value ...]}
shift
# $PWD/path for a relative path (a leading ./ dropped), an absolute one as it is.
absolute() { if [[ "$1" == /* ]]; then echo "$1"; else echo "$PWD/${1#./}"; fi; }
# absolute only when it exists here: hub-style names and `null` pass through.
absolute_if_exists() { if [[ -e "$1" ]]; then absolute "$1"; else echo "$1"; fi; }
if [[ ! -e "$CONFIG" && "$CONFIG" != /* && -e "$root/$CONFIG" ]]; then
    CONFIG="$root/$CONFIG"
fi
CONFIG=$(absolute_if_exists "$CONFIG")
if [[ -x "$root/.venv/bin/python" ]]; then PYTHON=${PYTHON:-$root/.venv/bin/python}; else PYTHON=${PYTHON:-python}; fi
# The package imports from the repository whatever the directory (an editable install does too).
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
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
[[ -n "${MODEL:-}" ]] && overrides+=("model=$(absolute_if_exists "$MODEL")")
[[ -n "${TEACHER:-}" ]] && overrides+=("teacher_model=$(absolute_if_exists "$TEACHER")")
if [[ -n "${DATA:-}" ]]; then
    files=()
    IFS=, read -ra data_items <<<"$DATA"
    for item in "${data_items[@]}"; do files+=("$(absolute_if_exists "$item")"); done
    overrides+=("data.dataset=[$(IFS=,; echo "${files[*]}")]")
fi
[[ -n "${OUTPUT_DIR:-}" ]] && overrides+=("training.output_dir=$(absolute "$OUTPUT_DIR")")
if [[ "$NNODES" == 1 ]]; then
    rendezvous=(--standalone)
else
    rendezvous=(--nnodes "$NNODES" --node-rank "${NODE_RANK:?NNODES=$NNODES: set NODE_RANK (0..$((NNODES - 1)))}"
                --master-addr "${MASTER_ADDR:?NNODES=$NNODES: set MASTER_ADDR (the NODE_RANK=0 node)}"
                --master-port "${MASTER_PORT:-29500}")
fi
exec "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc-per-node "$NPROC" \
    -m megatron_opd.train --config "$CONFIG" "${overrides[@]}" "$@"
