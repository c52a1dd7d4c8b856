"""The rollout engine a run's config asks for (`rollout.engine`), over a live Megatron model."""

from __future__ import annotations

import torch

from megatron_opd.checkpoint.pretrained import Pretrained
from megatron_opd.config.rollout import RolloutConfig
from megatron_opd.rollout.megatron_sampler import MegatronSampler
from megatron_opd.rollout.protocol import RolloutEngine
from megatron_opd.rollout.vllm_engine import VLLMEngine


def build_rollout_engine(rollout: RolloutConfig, model: torch.nn.Module, source: Pretrained, vocab_size: int,
                         dtype: torch.dtype, seed: int, device: torch.device, label: str) -> RolloutEngine:
    """`model` (loaded from `source`) sampled by the Megatron sampler, or by vLLM holding a
    synced copy of its weights. Collective over the world for vLLM (it starts one engine per
    data-parallel replica)."""
    if rollout.engine == "vllm":
        return VLLMEngine(model, source, vocab_size, rollout, dtype, seed, device, label=label)
    return MegatronSampler(model, vocab_size, label=label)
