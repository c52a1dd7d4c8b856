"""Supervised fine-tuning: cross-entropy on response tokens, no teacher.

The baseline distillation is measured against (the quickstart's `sft_baseline_accuracy`),
the way the quickstart trains its teacher, and the `sft_alpha` term of GKD. Sums, not
means, as in `algorithms.gkd`: the trainer normalizes once per global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_opd.algorithms.base import Algorithm, MicrobatchLoss, Responses, dataset_responses
from megatron_opd.algorithms.context import StepContext
from megatron_opd.ops import fused_linear_token_logprobs


def cross_entropy_sum(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                      vocab_size: int) -> torch.Tensor:
    """sum over `mask` of -log P(label): hidden `[b, s, H]`, head `[V/tp, H]`, labels and mask `[b, s]`.
    The LM head is applied chunk by chunk on the vocab shards (no `[b, s, V]` logits)."""
    return -fused_linear_token_logprobs(hidden[mask], head, labels[mask], vocab_size=vocab_size).sum()


@dataclass(frozen=True)
class SFTLoss:
    vocab_size: int

    def __call__(self, student_hidden: torch.Tensor, student_head: torch.Tensor, labels: torch.Tensor,
                 loss_mask: torch.Tensor, teacher=None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Summed CE, counted tokens and metric sums for one microbatch (shapes as in `GKDLoss`)."""
        mask = loss_mask.bool()
        loss = cross_entropy_sum(student_hidden, student_head, labels, mask, self.vocab_size)
        num_tokens = mask.sum().to(torch.int)
        return loss, num_tokens, {"loss_sum": loss.detach().clone(), "sft_loss_sum": loss.detach().clone(),
                                  "tokens": num_tokens.detach().clone()}


class SFT(Algorithm):
    """Plain CE on the dataset's responses, no teacher."""

    def __init__(self, vocab_size: int):
        self.loss = SFTLoss(vocab_size=vocab_size)

    def responses(self, context: StepContext, iteration: int) -> Responses:
        return dataset_responses(context)

    def teacher_signal(self, context: StepContext, responses: Responses) -> None:
        return None

    def microbatch_loss(self, responses: Responses) -> MicrobatchLoss:
        return self.loss

    @property
    def eval_loss(self) -> MicrobatchLoss:
        return self.loss
