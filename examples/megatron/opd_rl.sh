#!/usr/bin/env bash
# OPD-RL: GRPO with the teacher's log-ratio in each token's advantage.
#   bash examples/megatron/opd_rl.sh [CONFIG.yaml] [key=value ...]     (default CONFIG: configs/opd_rl_qwen2.5_0.5b_from_7b.yaml)
# Environment as in train.sh (NPROC, TP, PP, MODEL, TEACHER, DATA, OUTPUT_DIR, multi-node); runs
# from any directory, relative paths relative to it (see train.sh), the default CONFIG the repository's.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
if [[ "${1:-}" == *.yaml || "${1:-}" == *.yml ]]; then config=$1; shift; else config=$root/configs/opd_rl_qwen2.5_0.5b_from_7b.yaml; fi
exec bash "$root/examples/megatron/train.sh" "$config" "$@"
