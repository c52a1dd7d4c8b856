"""The training step loop shared by every algorithm."""

from megatron_opd.trainer.lm_step import lm_forward_backward

__all__ = ["lm_forward_backward"]
