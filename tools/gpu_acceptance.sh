#!/usr/bin/env bash
# GPU acceptance in one command, for a machine with an NVIDIA GPU:
#
#     bash tools/gpu_acceptance.sh
#
#   1. environment: nvidia-smi, and the versions of torch (CUDA build?), vllm, Transformer
#      Engine, transformers, megatron-core, ... each reported present/absent; stops here
#      (exit 2) when torch sees no CUDA device;
#   2. the CPU-safe tests that have CUDA branches (device choice, layer spec choice, CPU
#      mode's refusal on a CUDA machine), run on this machine where CUDA is real;
#   3. tools/gpu_train_check.py, the training side on CUDA: TE-spec logits of a random
#      Qwen2.5-0.5B-shaped model vs HF transformers (bf16), the same for a random Qwen3-MoE
#      with Qwen3-30B-A3B's layer shapes at 3 layers (TEGroupedMLP experts, alltoall
#      dispatcher: 128 experts, top-8; control: two experts swapped) and its fp32 logits at
#      EP=2 (NCCL) vs EP=1 (2+ GPUs, else SKIP), HF -> Megatron -> HF conversion
#      round trip (bit-exact, TE names), the fused divergence kernel vs eager math at 4096 x
#      151,936 (time, peak memory), one fp32 GKD step at TP=2 (NCCL) vs TP=1 (2+ GPUs, else
#      SKIP), the same step with packed rows (THD PackedSeqParams under TE) vs fixed rows,
#      20 bf16 GKD steps at TP=2 (1 GPU: TP=1) finite and decreasing;
#   4. tools/gpu_vllm_check.py (the GPU paths of rollout.engine: vllm: CUDA IPC weight push,
#      sleep mode levels 1 and 2, fp32 and bf16, TP=2 / DP=2 with 2+ GPUs) when `import vllm`
#      works, else a SKIP line; it gets what is left of the time budget (below), so the later
#      variants may be SKIPped for time (run it alone for all of them);
#   5. tools/bench_rollout.py on CUDA, when it has a --device option (else a SKIP line);
#   6. a summary, with every check line of steps 3 and 4; exit 0 when nothing failed, 1 when
#      something did, 2 when no GPU / no torch.
#
# No network is needed: it uses what is installed. Python: .venv/bin/python if present,
# else `python` (override: GPU_ACCEPTANCE_PYTHON=/path/to/python). The repository root goes
# on PYTHONPATH, so megatron_opd need not be pip-installed. Logs and JSON go to
# $GPU_ACCEPTANCE_LOG_DIR, else $OUT (when set), else a fresh /tmp directory.
# Extra arguments for the vLLM check: GPU_CHECK_ARGS="--variants fp32_llama2 --eager"; for the
# training check: GPU_TRAIN_CHECK_ARGS="--checks kernel_vs_eager".
# Time, on one H100/H200, under 10 minutes: steps 1-2 about 1 minute (each pytest run killed at
# 240 s); step 3 about 4.5 minutes (estimated, ~2 of them the MoE checks; killed at 330 s, no new
# check after 260 s); steps 4
# and 5 fit in what is left of GPU_ACCEPTANCE_SECONDS (default 570) from the start: step 4 gets the time left less 120 s for step 5, SKIPped under 90 s (each
# variant at most 200 s, no new one once its budget is spent: typically fp32_llama2 alone, the
# greedy and weight-sync checks; run tools/gpu_vllm_check.py alone for every variant); step 5 at
# most 120 s, SKIPped when under 30 s are left.
# Never called by CI: it needs a GPU (tests/test_gpu_acceptance_script.py checks only its refusal
# and, on CPU, tools/gpu_train_check.py's logic).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD

if [ -n "${GPU_ACCEPTANCE_PYTHON:-}" ]; then PY=$GPU_ACCEPTANCE_PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
elif command -v python >/dev/null 2>&1; then PY=python
elif command -v python3 >/dev/null 2>&1; then PY=python3
else
    echo "FAIL: no Python found (.venv/bin/python, python, python3)"; exit 2
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# No network on the GPU machines: no usage reports, no hub look-ups (every model is local).
export VLLM_NO_USAGE_STATS=${VLLM_NO_USAGE_STATS:-1} DO_NOT_TRACK=${DO_NOT_TRACK:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
LOG_DIR=${GPU_ACCEPTANCE_LOG_DIR:-${OUT:-}}
[ -n "$LOG_DIR" ] || { LOG_DIR=/tmp/gpu_acceptance.$(date +%Y%m%d-%H%M%S).$$; mkdir -p "$LOG_DIR"; }
mkdir -p "$LOG_DIR"

SUMMARY=()
FAILED=0
record() {  # record STATUS STEP DETAIL
    SUMMARY+=("$(printf '%-5s %-22s %s' "$1" "$2" "$3")")
    [ "$1" = FAIL ] && FAILED=1
    echo "$1 $2: $3"
}
section() { printf '\n==================== %s\n' "$*"; }
summary() {
    section "summary (logs: $LOG_DIR)"
    printf '%s\n' "${SUMMARY[@]}"
    for check in gpu_train_check gpu_vllm_check; do
        if [ -f "$LOG_DIR/$check.log" ]; then
            echo "-- tools/$check.py checks:"
            grep -E '^(PASS|FAIL|SKIP|MISSING) ' "$LOG_DIR/$check.log" | sed 's/^/   /'
        fi
    done
}
STARTED=$(date +%s)
TOTAL=${GPU_ACCEPTANCE_SECONDS:-570}
left() { echo $(( STARTED + TOTAL - $(date +%s) )); }  # seconds left of the whole script's budget

# ------------------------------------------------------------------ 1. environment
section "environment"
echo "repository: $REPO"
echo "python: $PY ($(command -v "$PY" 2>/dev/null || echo "$PY"))"
GPUS_SMI=0
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 60 nvidia-smi 2>&1 | tee "$LOG_DIR/nvidia-smi.txt"
    GPUS_SMI=$(timeout 30 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -c . || true)
    record INFO nvidia-smi "$GPUS_SMI GPU(s): $(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version \
        --format=csv,noheader 2>/dev/null | head -1)"
else
    record INFO nvidia-smi "not found (no NVIDIA driver on this machine?)"
fi

"$PY" - >"$LOG_DIR/versions.txt" 2>"$LOG_DIR/versions.err" <<'EOF'
import importlib
import warnings

warnings.filterwarnings("ignore")
for module in ("torch", "megatron.core", "transformers", "safetensors", "vllm", "transformer_engine", "apex",
               "flash_attn", "pynvml", "pytest", "pytest_timeout"):
    try:
        found = importlib.import_module(module)
        print(f"{module}: present {getattr(found, '__version__', '')}".rstrip())
    except Exception as error:  # noqa: BLE001
        print(f"{module}: absent ({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''})")
try:
    import torch
except Exception:  # noqa: BLE001
    print("GPUS=-1")
else:
    available = torch.cuda.is_available()
    print(f"torch.version.cuda: {torch.version.cuda}; cuda available: {available}")
    count = torch.cuda.device_count() if available else 0
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        print(f"cuda:{index}: {props.name}, {props.total_memory / 2**30:.0f} GiB, capability "
              f"{props.major}.{props.minor}")
    if available:
        print(f"bf16 supported: {torch.cuda.is_bf16_supported()}; nccl: "
              f"{'.'.join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, 'nccl') else '?'}")
    print(f"GPUS={count}")
EOF
VERSIONS_RC=$?
grep -v '^GPUS=' "$LOG_DIR/versions.txt"
GPUS=$(sed -n 's/^GPUS=//p' "$LOG_DIR/versions.txt" | tail -1)
if [ "$VERSIONS_RC" -ne 0 ] || [ -z "$GPUS" ]; then
    tail -5 "$LOG_DIR/versions.err"
    record FAIL environment "the version probe failed (exit $VERSIONS_RC; see $LOG_DIR/versions.err)"
    summary; exit 2
fi
if [ "$GPUS" = "-1" ]; then
    record FAIL torch "torch does not import with $PY"
    summary; exit 2
fi
if [ "$GPUS" = "0" ]; then
    if [ "$GPUS_SMI" -gt 0 ]; then
        record FAIL gpu "nvidia-smi lists $GPUS_SMI GPU(s) but $PY's torch sees none: $(grep '^torch' "$LOG_DIR/versions.txt" | tr '\n' ' ')(a CPU build of torch? try GPU_ACCEPTANCE_PYTHON=<a python with CUDA torch>)"
    else
        record FAIL gpu "no GPU: torch.cuda.is_available() is False and nvidia-smi lists none; this script needs an NVIDIA GPU (nothing else was run)"
    fi
    summary
    echo "gpu_acceptance: no GPU usable from $PY: nothing was tested (exit 2)"
    exit 2
fi
record PASS environment "$GPUS CUDA device(s) visible to torch"
for module in vllm transformer_engine; do
    record INFO "$module" "$(grep "^$module:" "$LOG_DIR/versions.txt" | cut -d' ' -f2-)"
done
HAVE_VLLM=0
grep -q '^vllm: present' "$LOG_DIR/versions.txt" && HAVE_VLLM=1

# ------------------------------------------------------------------ 2. CPU-safe tests with CUDA branches
section "tests with CUDA branches (CPU-safe subset)"
# Two runs, so that the summary tells them apart: device/layer-spec choice, and CPU mode
# (whose tests install it in-process: on a machine with CUDA that is refused unless forced).
if "$PY" -c "import pytest" >/dev/null 2>&1; then
    for group in "pytest_runtime_builder:tests/test_runtime.py tests/test_builder.py" \
                 "pytest_cpu_mode:tests/test_cpu_mode.py"; do
        step=${group%%:*}
        read -r -a files <<<"${group#*:}"
        timeout --kill-after=20 240 "$PY" -m pytest -q -p no:cacheprovider -m "not slow and not vllm" "${files[@]}" \
            2>&1 | tee "$LOG_DIR/$step.log"
        rc=${PIPESTATUS[0]}
        line=$(grep -E '(passed|failed|error)' "$LOG_DIR/$step.log" | tail -1)
        if [ "$rc" -eq 0 ]; then record PASS "$step" "${line:-exit 0}"
        elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then record FAIL "$step" "timed out after 240s"
        else record FAIL "$step" "exit $rc: ${line:-see $LOG_DIR/$step.log}"
        fi
    done
else
    record SKIP pytest "pytest is not installed for $PY"
fi

# ------------------------------------------------------------------ 3. training side on CUDA
run_check() {  # run_check NAME KILL_AFTER_SECONDS ARGS...: tools/NAME.py, recorded like the others
    local name=$1 limit=$2
    shift 2
    timeout --kill-after=30 "$limit" "$PY" "tools/$name.py" --json "$LOG_DIR/$name.json" "$@" 2>&1 \
        | tee "$LOG_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    local line
    line=$(grep "^$name:" "$LOG_DIR/$name.log" | tail -1)
    case "$rc" in
        0) record PASS "$name" "${line:-exit 0}" ;;
        1) record FAIL "$name" "${line:-exit 1}" ;;
        2) record FAIL "$name" "could not run: $(grep '^MISSING' "$LOG_DIR/$name.log" | tr '\n' ' ')" ;;
        124|137) record FAIL "$name" "timed out after ${limit}s (${line:-see the log})" ;;
        *) record FAIL "$name" "exit $rc (see $LOG_DIR/$name.log)" ;;
    esac
}

section "tools/gpu_train_check.py"
# shellcheck disable=SC2086 # GPU_TRAIN_CHECK_ARGS is a list of arguments
run_check gpu_train_check 330 --device cuda --budget 260 --timeout 150 ${GPU_TRAIN_CHECK_ARGS:-}

# ------------------------------------------------------------------ 4. vLLM GPU paths
section "tools/gpu_vllm_check.py"
VLLM_S=$(( $(left) - 120 ))  # what this step may take: step 5 keeps its 120 s
if [ "$HAVE_VLLM" -ne 1 ]; then
    record SKIP gpu_vllm_check "vllm does not import with $PY ($(grep '^vllm:' "$LOG_DIR/versions.txt" | cut -d' ' -f2-)); on a GPU machine: pip install -e \".[vllm]\""
elif [ "$VLLM_S" -lt 90 ]; then
    record SKIP gpu_vllm_check "the time budget (GPU_ACCEPTANCE_SECONDS=$TOTAL) is spent: $(left)s left"
else
    # at most 200 s per variant (a cold vLLM start is ~1 minute); no new variant after VLLM_BUDGET s
    VLLM_VARIANT_S=$(( VLLM_S - 10 < 200 ? VLLM_S - 10 : 200 ))
    VLLM_BUDGET=$(( VLLM_S - VLLM_VARIANT_S - 10 ))
    [ "$VLLM_BUDGET" -ge 1 ] || VLLM_BUDGET=1
    # shellcheck disable=SC2086 # GPU_CHECK_ARGS is a list of arguments
    run_check gpu_vllm_check "$VLLM_S" --budget "$VLLM_BUDGET" --timeout "$VLLM_VARIANT_S" ${GPU_CHECK_ARGS:-}
fi

# ------------------------------------------------------------------ 5. rollout benchmark on CUDA
section "tools/bench_rollout.py"
BENCH_S=$(left)
[ "$BENCH_S" -le 120 ] || BENCH_S=120
if [ ! -f tools/bench_rollout.py ]; then
    record SKIP bench_rollout "tools/bench_rollout.py does not exist"
elif [ "$HAVE_VLLM" -ne 1 ]; then
    record SKIP bench_rollout "needs vllm"
elif [ "$BENCH_S" -lt 30 ]; then
    record SKIP bench_rollout "the time budget (GPU_ACCEPTANCE_SECONDS=$TOTAL) is spent: $(left)s left"
elif ! timeout 60 "$PY" tools/bench_rollout.py --help 2>/dev/null | grep -q -- '--device'; then
    record SKIP bench_rollout "it has no --device option (it runs its ranks on CPU only)"
else
    timeout --kill-after=20 "$BENCH_S" "$PY" tools/bench_rollout.py --device cuda --repeats 2 \
        --json "$LOG_DIR/bench_rollout.json" 2>&1 | tee "$LOG_DIR/bench_rollout.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then record PASS bench_rollout "results in $LOG_DIR/bench_rollout.json"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then record FAIL bench_rollout "timed out after ${BENCH_S}s"
    else record FAIL bench_rollout "exit $rc (see $LOG_DIR/bench_rollout.log)"
    fi
fi

record INFO wall "$(( $(date +%s) - STARTED ))s"
summary
if [ "$FAILED" -ne 0 ]; then
    echo "gpu_acceptance: FAILED"
    exit 1
fi
echo "gpu_acceptance: all passed (SKIP lines above were not run)"
exit 0
