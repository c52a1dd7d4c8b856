"""Running a model through Megatron-Core's pipeline schedule: what teachers, rollout, checkpoint
verification and the trainer share (microbatches, the schedule wrapper, forward-only passes
that keep a tensor per microbatch, the plain LM step); microbatches by fixed rows or a token budget
(`batching`), and sequence packing (`packing`)."""

from megatron_opd.pipeline.batching import make_microbatches, padding_fraction, plan_microbatches
from megatron_opd.pipeline.forward import collect_forward_only, eval_mode
from megatron_opd.pipeline.lm_step import lm_forward_backward
from megatron_opd.pipeline.microbatch import Microbatch
from megatron_opd.pipeline.schedule import LossFunction, run_microbatches

__all__ = ["LossFunction", "Microbatch", "collect_forward_only", "eval_mode", "lm_forward_backward",
           "make_microbatches", "padding_fraction", "plan_microbatches", "run_microbatches"]
