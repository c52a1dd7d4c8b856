"""tools/bench_rollout.py: its summary arithmetic (no vLLM), and one tiny end-to-end run (`make test-vllm`)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "bench_rollout.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_rollout", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rank_row(order, megatron_s, vllm_s, sync_s, cpu, sync_bytes):
    side = lambda seconds: {"tokens": 64, "seconds": seconds, "cpu_seconds": cpu, "engine_seconds": seconds,
                            "vllm_processes_cpu_seconds": 0.0}
    return {"order": order, "identical_completions": False, "megatron": side(megatron_s), "vllm": side(vllm_s),
            "sync": {"seconds": sync_s, "cpu_seconds": cpu, "engine_seconds": sync_s, "bytes": sync_bytes}}


def test_summary_pairs_repeats_takes_slowest_rank_and_sums_cpu():
    bench = load_bench()
    # Two ranks, three repeats; rank 1 is slower in repeat 0 (the slowest rank's wall time counts).
    host = {"is_host": True, "torch_threads": 1, "vllm_start_s": 1.0, "warm_up": {}, "processes": [],
            "repeats": [_rank_row(["megatron", "vllm"], 1.0, 0.5, 0.2, 0.1, 2e9),
                        _rank_row(["vllm", "megatron"], 2.0, 0.5, 0.4, 0.1, 2e9),
                        _rank_row(["megatron", "vllm"], 1.0, 1.0, 0.3, 0.1, 2e9)]}
    other = {"is_host": False, "torch_threads": 1, "vllm_start_s": 0.0, "warm_up": {}, "processes": [],
             "repeats": [_rank_row(["megatron", "vllm"], 4.0, 0.5, 0.2, 0.1, 0.0),
                         _rank_row(["vllm", "megatron"], 2.0, 0.5, 0.4, 0.1, 0.0),
                         _rank_row(["megatron", "vllm"], 1.0, 1.0, 0.3, 0.1, 0.0)]}
    result = bench.summarize([other, host])
    # tokens/s per repeat: megatron 16, 32, 64; vllm 128, 128, 64; paired ratios 8, 4, 1
    assert result["megatron"]["tokens_per_s"] == 32 and result["vllm"]["tokens_per_s"] == 128
    assert result["vllm_over_megatron"] == 4
    assert result["megatron"]["cpu_seconds"] == pytest.approx(0.2)  # summed over the two ranks
    assert result["sync"]["bytes"] == 2e9 and result["sync"]["seconds"] == 0.3
    assert result["sync"]["s_per_gb"] == pytest.approx(0.15)


def test_refuses_a_length_beyond_the_model(tmp_path):
    # The quickstart teacher has 64 positions: vLLM would refuse max_model_len 80 after a slow start.
    done = subprocess.run([sys.executable, str(SCRIPT), "--prompt-length", "48", "--max-new-tokens", "32"],
                          check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0 and "max_position_embeddings (64)" in done.stderr, done.stderr[-2000:]


@pytest.mark.vllm
def test_tiny_run_writes_positive_medians(tmp_path):
    out = tmp_path / "bench_rollout.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--prompts", "4", "--max-new-tokens", "4", "--repeats", "1",
                           "--settle", "0", "--json", str(out)], check=False, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    for side in ("megatron", "vllm"):
        assert result[side]["tokens"] == 4 * 4
        assert result[side]["tokens_per_s"] > 0 and result[side]["seconds"] > 0 and result[side]["cpu_seconds"] > 0
    assert result["vllm_over_megatron"] > 0
    assert result["sync"]["seconds"] > 0 and result["sync"]["bytes"] > 0 and result["sync"]["s_per_gb"] > 0
    assert "vLLM / Megatron" in done.stdout
