"""Where a colocated vLLM engine runs on GPU (`VLLMEngine._engine_gpus`): the GPUs of the
first `vllm_tensor_parallel_size` ranks of its replica's model-parallel group, named as
CUDA_VISIBLE_DEVICES names them. Pure bookkeeping, checked without a GPU or vLLM."""

from __future__ import annotations

import os

import pytest

from megatron_opd.config.rollout import RolloutConfig
from megatron_opd.config.schema import ConfigError
from megatron_opd.rollout.vllm_engine import VLLMEngine, _visible_gpus


def engine(members, vllm_tp: int) -> VLLMEngine:
    placed = VLLMEngine.__new__(VLLMEngine)  # the bookkeeping only: no process group, no vLLM
    placed.members = members
    placed.rollout = RolloutConfig(engine="vllm", vllm_tensor_parallel_size=vllm_tp)
    return placed


# (global rank, is host, node, local CUDA device index) of a TP=2 group on GPUs 2 and 3 of node b
GROUP = [(6, True, "b", 2), (7, False, "b", 3)]


def test_engine_gpus_follow_the_group_and_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert engine(GROUP, 1)._engine_gpus() == ["2"]
    assert engine(GROUP, 2)._engine_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    assert engine(GROUP, 2)._engine_gpus() == ["6", "7"]
    with pytest.raises(ConfigError, match=r"rollout.vllm_tensor_parallel_size=3 is invalid: .* \(2 here\)"):
        engine(GROUP, 3)._engine_gpus()
    # ranks of the group on another node do not count
    with pytest.raises(ConfigError, match=r"\(1 here\)"):
        engine([(0, True, "a", 0), (1, False, "b", 0)], 2)._engine_gpus()


def test_visible_gpus_is_set_for_the_block_and_restored(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with _visible_gpus(["2", "3"]):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with _visible_gpus(["5"]):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with _visible_gpus(None):  # CPU: untouched
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
