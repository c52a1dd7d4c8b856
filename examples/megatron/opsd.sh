#!/usr/bin/env bash
# OPSD: self-distillation, the student fed each row's teacher_prompt is its own teacher.
#   bash examples/megatron/opsd.sh [CONFIG.yaml] [key=value ...]     (default CONFIG: configs/opsd_qwen2.5_1.5b.yaml)
# Environment as in train.sh (NPROC, TP, PP, MODEL, TEACHER, DATA, OUTPUT_DIR, multi-node); runs
# from any directory, relative paths relative to it (see train.sh), the default CONFIG the repository's.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
if [[ "${1:-}" == *.yaml || "${1:-}" == *.yml ]]; then config=$1; shift; else config=$root/configs/opsd_qwen2.5_1.5b.yaml; fi
exec bash "$root/examples/megatron/train.sh" "$config" "$@"
