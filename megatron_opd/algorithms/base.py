"""What every algorithm is to the trainer: how a step's responses are made, what the teacher
contributes, and the loss on one microbatch.

The trainer's step reads top to bottom (`trainer.Trainer.train_step`):

    responses = algorithm.responses(context, iteration)        # batch -> responses
    signals   = algorithm.teacher_signal(context, responses)   # the teacher's answer per microbatch
    loss      = algorithm.microbatch_loss(responses)           # student forward-backward with it
    optimizer step, metrics, checkpoint

and never asks which algorithm it runs. `context` (`algorithms.context.StepContext`) is the
toolbox over the student, its teacher, the data and the rollout engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_opd.algorithms.context import MicrobatchLoss, ResponseSource, StepContext
from megatron_opd.pipeline import Microbatch


@dataclass
class Responses:
    """One step's sequences on this data-parallel rank, with the responses the loss trains on."""

    examples: list[dict]  # tokenized rows (`input_ids`, `loss_mask`, ...) with `_position`, `_row`, `_split`
    microbatches: list[Microbatch]
    source: ResponseSource  # the dataset's responses, or samples of the student / the teacher
    sums: dict[str, float] = field(default_factory=dict)  # this rank's sums, reduced with the loss metrics
    metrics: dict[str, float] = field(default_factory=dict)  # already global (e.g. rewards)
    # The sampling engine's log-probs of the sampled responses, `[N]` per microbatch, when it
    # is not the trainer's own model (vLLM); the step logs the train/inference mismatch
    rollout_logprobs: Optional[list[torch.Tensor]] = None


class Algorithm(ABC):
    """A training method on the shared loop. Subclasses say how a step's batch is made,
    the teacher's signal and the per-microbatch loss; state between steps (OPD-RL's
    rollout batch, reused for `num_iterations` steps) lives in the object."""

    samples: bool = False  # whether some step samples responses (needs EOS ids at start)
    group_size: int = 1  # sequences per prompt in a step's global batch

    @abstractmethod
    def responses(self, context: StepContext, iteration: int) -> Responses:
        """Step `iteration`'s sequences on this DP rank (reads the data iterator, may sample)."""

    def teacher_signal(self, context: StepContext, responses: Responses) -> Optional[list]:
        """What the loss compares the student with, per microbatch on the last stage (None
        elsewhere, and without a teacher): by default the teacher's output (`teachers.outputs`)."""
        return context.teacher_forward(responses.examples, responses.microbatches)

    @abstractmethod
    def microbatch_loss(self, responses: Responses) -> MicrobatchLoss:
        """The loss the student trains on for these responses."""

    @property
    @abstractmethod
    def eval_loss(self) -> MicrobatchLoss:
        """The held-out loss (`Trainer.evaluate`) on dataset or sampled responses and the teacher's output."""

    def step_metrics(self, responses: Responses) -> dict[str, float]:
        """Per-step metrics that are the same on every rank (e.g. whether the step was on-policy)."""
        return dict(responses.metrics)


def dataset_responses(context: StepContext) -> Responses:
    """The next global batch's own responses on this DP rank."""
    examples = context.next_examples()
    return Responses(examples, context.microbatches(examples), "dataset")
