#!/usr/bin/env bash
# OPSD: self-distillation, the student fed each row's teacher_prompt is its own teacher.
#   bash examples/megatron/opsd.sh [CONFIG.yaml] [key=value ...]     (default CONFIG: configs/opsd_qwen2.5_1.5b.yaml)
# Environment as in train.sh (NPROC, TP, PP, MODEL, TEACHER, DATA, OUTPUT_DIR, multi-node).
set -euo pipefail
here="$(dirname "$0")"
if [[ "${1:-}" == *.yaml ]]; then config=$1; shift; else config=configs/opsd_qwen2.5_1.5b.yaml; fi
exec bash "$here/train.sh" "$config" "$@"
