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
#   3. tools/gpu_vllm_check.py (the GPU paths of rollout.engine: vllm: CUDA IPC weight push,
#      sleep mode levels 1 and 2, fp32 and bf16, TP=2 / DP=2 with 2+ GPUs) when `import vllm`
#      works, else a SKIP line;
#   4. tools/bench_rollout.py on CUDA, when it has a --device option (else a SKIP line);
#   5. a summary; exit 0 when nothing failed, 1 when something did, 2 when no GPU / no torch.
#
# No network is needed: it uses what is installed. Python: .venv/bin/python if present,
# else `python` (override: GPU_ACCEPTANCE_PYTHON=/path/to/python). The repository root goes
# on PYTHONPATH, so megatron_opd need not be pip-installed. Logs and JSON go to
# $GPU_ACCEPTANCE_LOG_DIR, else $OUT (when set), else a fresh /tmp directory.
# Extra arguments for the vLLM check: GPU_CHECK_ARGS="--variants fp32_llama2 --eager".
# Time: about 1 minute for steps 1-2, at most 7 for step 3 (no new variant after 270 s, 200 s
# each), 2.5 for step 4: under 11 in the worst case.

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
    if [ -f "$LOG_DIR/gpu_vllm_check.log" ]; then
        echo "-- tools/gpu_vllm_check.py checks:"
        grep -E '^(PASS|FAIL|SKIP|MISSING) ' "$LOG_DIR/gpu_vllm_check.log" | sed 's/^/   /'
    fi
}
STARTED=$(date +%s)

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

# ------------------------------------------------------------------ 3. vLLM GPU paths
section "tools/gpu_vllm_check.py"
if [ "$HAVE_VLLM" -eq 1 ]; then
    # shellcheck disable=SC2086 # GPU_CHECK_ARGS is a list of arguments
    timeout --kill-after=30 420 "$PY" tools/gpu_vllm_check.py --budget 270 --timeout 200 \
        --json "$LOG_DIR/gpu_vllm_check.json" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$LOG_DIR/gpu_vllm_check.log"
    rc=${PIPESTATUS[0]}
    line=$(grep '^gpu_vllm_check:' "$LOG_DIR/gpu_vllm_check.log" | tail -1)
    case "$rc" in
        0) record PASS gpu_vllm_check "${line:-exit 0}" ;;
        1) record FAIL gpu_vllm_check "${line:-exit 1}" ;;
        2) record FAIL gpu_vllm_check "could not run: $(grep '^MISSING' "$LOG_DIR/gpu_vllm_check.log" | tr '\n' ' ')" ;;
        124|137) record FAIL gpu_vllm_check "timed out after 420s (${line:-see the log})" ;;
        *) record FAIL gpu_vllm_check "exit $rc (see $LOG_DIR/gpu_vllm_check.log)" ;;
    esac
else
    record SKIP gpu_vllm_check "vllm does not import with $PY ($(grep '^vllm:' "$LOG_DIR/versions.txt" | cut -d' ' -f2-)); on a GPU machine: pip install -e \".[vllm]\""
fi

# ------------------------------------------------------------------ 4. rollout benchmark on CUDA
section "tools/bench_rollout.py"
if [ ! -f tools/bench_rollout.py ]; then
    record SKIP bench_rollout "tools/bench_rollout.py does not exist"
elif [ "$HAVE_VLLM" -ne 1 ]; then
    record SKIP bench_rollout "needs vllm"
elif ! timeout 120 "$PY" tools/bench_rollout.py --help 2>/dev/null | grep -q -- '--device'; then
    record SKIP bench_rollout "it has no --device option (it runs its ranks on CPU only)"
else
    timeout --kill-after=30 150 "$PY" tools/bench_rollout.py --device cuda --repeats 2 \
        --json "$LOG_DIR/bench_rollout.json" 2>&1 | tee "$LOG_DIR/bench_rollout.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then record PASS bench_rollout "results in $LOG_DIR/bench_rollout.json"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then record FAIL bench_rollout "timed out after 150s"
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
