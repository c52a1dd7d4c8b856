"""Training methods on the shared loop, as objects (`base.Algorithm`): GKD, OPD-RL, SFT.
OPSD is not an algorithm of its own but a teacher mode of GKD and OPD-RL (`teacher: self`, `opsd.py`)."""

from megatron_opd.algorithms.base import Algorithm, MicrobatchLoss, Responses, ResponseSource
from megatron_opd.algorithms.context import StepContext
from megatron_opd.algorithms.gkd import GKD
from megatron_opd.algorithms.opd_rl_rollout import OPDRL
from megatron_opd.algorithms.rewards import load_reward_functions
from megatron_opd.algorithms.sft import SFT
from megatron_opd.config.job import JobConfig


def build_algorithm(config: JobConfig, vocab_size: int) -> Algorithm:
    """The `algorithm` the config names (its reward functions imported now: a bad one fails at start)."""
    if config.algorithm == "opd_rl":
        return OPDRL(config, vocab_size, load_reward_functions(config.reward_funcs))
    if config.algorithm == "sft":
        return SFT(vocab_size)
    return GKD(config, vocab_size)


__all__ = ["Algorithm", "GKD", "MicrobatchLoss", "OPDRL", "Responses", "ResponseSource", "SFT", "StepContext",
           "build_algorithm"]
