"""Generation for on-policy training: a rollout protocol, the Megatron-native sampler, and
vLLM (colocated, weights pushed from Megatron after each update)."""

from megatron_opd.rollout.build import build_rollout_engine
from megatron_opd.rollout.megatron_sampler import MegatronSampler
from megatron_opd.rollout.protocol import Rollout, RolloutEngine, SamplingParams, check_request, eos_token_ids
from megatron_opd.rollout.vllm_engine import VLLMEngine, VLLMError, import_vllm

__all__ = ["MegatronSampler", "Rollout", "RolloutEngine", "SamplingParams", "VLLMEngine", "VLLMError",
           "build_rollout_engine", "check_request", "eos_token_ids", "import_vllm"]
