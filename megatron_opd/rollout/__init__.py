"""Generation for on-policy training: a rollout protocol and the Megatron-native sampler."""

from megatron_opd.rollout.megatron_sampler import MegatronSampler
from megatron_opd.rollout.protocol import Rollout, RolloutEngine, SamplingParams, eos_token_ids

__all__ = ["MegatronSampler", "Rollout", "RolloutEngine", "SamplingParams", "eos_token_ids"]
