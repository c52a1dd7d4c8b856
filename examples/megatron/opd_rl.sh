#!/usr/bin/env bash
# OPD-RL: GRPO with the teacher's log-ratio in each token's advantage.
#   bash examples/megatron/opd_rl.sh [CONFIG.yaml] [key=value ...]     (default CONFIG: configs/opd_rl_qwen2.5_0.5b_from_7b.yaml)
# Environment as in train.sh (NPROC, TP, PP, MODEL, TEACHER, DATA, OUTPUT_DIR, multi-node).
set -euo pipefail
here="$(dirname "$0")"
if [[ "${1:-}" == *.yaml ]]; then config=$1; shift; else config=configs/opd_rl_qwen2.5_0.5b_from_7b.yaml; fi
exec bash "$here/train.sh" "$config" "$@"
