"""CPU mode redirects exactly what its docstring says, and undoes it."""

import pytest
import torch

from megatron_opd.config import ParallelConfig
from megatron_opd.runtime import cpu_mode
from megatron_opd.testing import run_distributed
from tests.tiny_models import GQA_QKNORM


@pytest.fixture
def installed():
    assert not cpu_mode.is_installed()
    cpu_mode.install(force=True)  # forced: tools/gpu_acceptance.sh runs this file on CUDA machines
    yield
    cpu_mode.uninstall()


def test_cuda_device_arguments_land_on_cpu(installed):
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(3, device="cuda:0").device.type == "cpu"
    assert torch.ones(1, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.arange(4, device=torch.device("cuda")).tolist() == [0, 1, 2, 3]
    t = torch.randn(3)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"
    assert t.to(torch.cuda.current_device(), torch.float64).dtype == torch.float64


def test_tensor_type_reports_cuda_type_strings(installed):
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64  # conversion still works


def test_cuda_rng_functions_drive_the_cpu_generator(installed):
    torch.cuda.manual_seed(7)
    first = torch.rand(4)
    state = torch.cuda.get_rng_state()
    second = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(4), second)
    torch.manual_seed(7)  # must not recurse through the patched manual_seed_all
    assert torch.equal(torch.rand(4), first)


def test_cuda_streams_are_a_completed_cpu_stream(installed):
    """Megatron-Core 0.19's DDP orders its grad reduction on streams (current_stream().wait_event,
    wait_stream); in CPU mode both streams are one stream on which everything has completed.
    Without the stand-in a CPU build raises and a CUDA build initializes CUDA (in a forked rank: fails)."""
    stream = torch.cuda.current_stream()
    assert stream is torch.cuda.default_stream() and stream.device == torch.device("cpu")
    event = object()
    assert stream.wait_event(event) is None and stream.wait_stream(stream) is None
    assert stream.record_event(event) is event and stream.query() is True


def test_uninstall_restores_torch():
    import megatron.core.tensor_parallel.random as megatron_random

    original, stream = torch.cuda.current_device, torch.cuda.current_stream
    recompute = megatron_random.CheckpointFunction.__dict__["backward"]
    cpu_mode.install(force=True)
    assert megatron_random.CheckpointFunction.__dict__["backward"] is not recompute
    cpu_mode.install(force=True)  # idempotent
    cpu_mode.uninstall()
    assert torch.cuda.current_device is original and torch.cuda.current_stream is stream
    assert megatron_random.CheckpointFunction.__dict__["backward"] is recompute  # still a staticmethod
    assert torch.zeros(1).type() == "torch.FloatTensor"
    if torch.cuda.is_available():
        assert torch.zeros(1, device="cuda").device.type == "cuda"
    else:
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")


def test_refuses_to_install_where_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="MEGATRON_OPD_DEVICE=cpu"):
        cpu_mode.install()
    assert not cpu_mode.is_installed()


def dropout_streams() -> dict:
    """Dropout masks inside and outside Megatron's model-parallel RNG fork at TP=2."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_opd.runtime import initialize_runtime

    initialize_runtime(ParallelConfig(tensor_model_parallel_size=2, seed=11))
    ones = torch.ones(4096)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        inside = torch.nn.functional.dropout(ones, 0.5)
    forked_and_back = torch.equal(before, torch.get_rng_state())
    outside = torch.nn.functional.dropout(ones, 0.5)
    return {"tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "inside": inside, "outside": outside, "restored": forked_and_back}


def test_rng_tracker_gives_tp_ranks_their_own_stream_inside_the_fork():
    rank0, rank1 = run_distributed(dropout_streams, 2)
    assert rank0["restored"] and rank1["restored"]
    assert not torch.equal(rank0["inside"], rank1["inside"])  # TP regions: per-rank masks
    assert torch.equal(rank0["outside"], rank1["outside"])  # replicated regions: same mask


def test_megatron_models_import_after_install():
    """Megatron's GPT model applies torch.compile (`jit_fuser`) at import; with CPU mode on
    first (as `initialize_runtime` before a lazy import does) that used to fail in dynamo
    on one no-op function patched under several torch.cuda names."""
    import os
    import subprocess
    import sys

    code = ("from megatron_opd.config import ParallelConfig; from megatron_opd.runtime import initialize_runtime; "
            "initialize_runtime(ParallelConfig()); import megatron.core.models.gpt; print('ok')")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "MEGATRON_OPD_DEVICE": "cpu"})
    assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), completed.stderr[-2000:]


def test_suspended_lifts_the_redirection_and_restores_it(installed):
    with cpu_mode.suspended():
        with pytest.raises((AssertionError, RuntimeError)):  # "Torch not compiled with CUDA enabled"
            torch.zeros(1, device="cuda")
        with cpu_mode.redirecting():
            assert torch.zeros(1, device="cuda").device.type == "cpu"
    assert torch.zeros(1, device="cuda").device.type == "cpu"


def dense_forwards(attention_dropout: float) -> dict:
    """A dense model's forward (`forward_hidden_states`, the redirection lifted) in training mode:
    with attention dropout, Megatron's own attention makes its causal mask with device="cuda"."""
    import dataclasses

    from megatron_opd.models import build_gpt_model
    from megatron_opd.models.outputs import forward_hidden_states
    from megatron_opd.runtime import initialize_runtime

    runtime = initialize_runtime(ParallelConfig())
    model = build_gpt_model(dataclasses.replace(GQA_QKNORM, attention_dropout=attention_dropout), runtime).train()
    tokens = torch.randint(0, 200, (2, 9))
    hidden = forward_hidden_states(model, tokens, torch.arange(9).expand(2, 9))
    return {"shape": tuple(hidden.shape), "device": hidden.device.type}


@pytest.mark.parametrize("attention_dropout", [0.0, 0.1])
def test_dense_forward_without_the_redirection(attention_dropout):
    (result,) = run_distributed(dense_forwards, 1, attention_dropout)
    assert result == {"shape": (9, 2, GQA_QKNORM.hidden_size), "device": "cpu"}
