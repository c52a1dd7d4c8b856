"""GKD's loss on one microbatch: generalized JSD(beta) to the teacher + `sft_alpha` * CE.

    loss = sum over counted tokens of [ D_beta(P_T || P_S)(t) + sft_alpha * (-log P_S(y_t)) ]

Sums, not means: the trainer runs Megatron's schedule with per-token loss
(`calculate_per_token_loss`), which adds the token counts of every microbatch and
data-parallel rank and divides the gradient once by the global batch's count. So
every counted token of the global batch weighs the same, however the batch is split
(peers that average per-microbatch means weigh a token of a short microbatch more).

The divergence is `ops.fused_linear_divergence` on the two models' final hidden
states and LM-head shards (temperature on both; top-K of the teacher when
`gkd_logits_topk`), the CE `ops.fused_linear_token_logprobs` at temperature 1, only on
dataset (or teacher) responses, never on the student's own samples.

Which responses a step trains on (`lmbda`, `seq_kd`) is `response_source`; `GKD.responses`
samples them (`rollout.MegatronSampler`) before the teacher's forward, with no gradient.
`algorithm: sft` is `SFT`: the dataset's responses and plain CE, no teacher.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_opd.algorithms.base import Algorithm, MicrobatchLoss, Responses, ResponseSource, dataset_responses
from megatron_opd.algorithms.context import StepContext
from megatron_opd.algorithms.sft import cross_entropy_sum
from megatron_opd.config.job import JobConfig
from megatron_opd.runtime.seeds import step_uniform
from megatron_opd.teachers.outputs import TeacherMix, TeacherOutput, as_mix, sums_by_teacher


def response_source(lmbda: float, seq_kd: bool, seed: int, iteration: int) -> ResponseSource:
    """Where step `iteration`'s responses come from: the student's samples with probability
    `lmbda` (on-policy), else the teacher's samples (`seq_kd`) or the dataset's responses.

    One draw per step from a generator seeded by (seed, iteration): every rank computes
    the same decision without communicating, and a resumed run repeats it.
    """
    if step_uniform(seed, "gkd", iteration) < lmbda:
        return "student"
    return "teacher" if seq_kd else "dataset"


@dataclass(frozen=True)
class GKDLoss:
    beta: float
    temperature: float  # of a bare teacher answer; a TeacherMix carries each teacher's own
    sft_alpha: float
    topk: Optional[int]  # likewise
    vocab_size: int  # ids >= this are padding in both models' heads
    opsd_clip: Optional[float] = None  # teacher: self: each token's divergence at most this

    def __call__(self, student_hidden: torch.Tensor, student_head: torch.Tensor, labels: torch.Tensor,
                 loss_mask: torch.Tensor, teacher: TeacherOutput | TeacherMix, with_sft: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Summed loss, counted tokens and metric sums for one microbatch.

        student_hidden `[b, s, H]` (after `models.outputs.head_input`), student_head
        `[V/tp, H]`, labels and loss_mask `[b, s]`, the teacher's answer at the mask's N
        response tokens (`teachers.outputs`: each row against its own teacher). A clipped token
        (`opsd_clip`) passes no gradient; `with_sft`: add `sft_alpha` * CE (on dataset or teacher
        responses, never on student samples). With several teachers, also per teacher the
        divergence summed over its tokens and its token count (`sums_by_teacher`).
        """
        mask = loss_mask.bool()
        mix = as_mix(teacher, self.temperature, self.topk)
        per_token = mix.divergence(student_hidden[mask], student_head, beta=self.beta, vocab_size=self.vocab_size)
        if self.opsd_clip is not None:
            per_token = per_token.clamp(max=self.opsd_clip)
        divergence = per_token.sum()
        loss = divergence
        metrics = {"divergence_sum": divergence.detach().clone(), **sums_by_teacher(mix.groups(),
                                                                                     {"divergence": per_token})}
        if with_sft and self.sft_alpha > 0:
            cross_entropy = cross_entropy_sum(student_hidden, student_head, labels, mask, self.vocab_size)
            loss = loss + self.sft_alpha * cross_entropy
            metrics["sft_loss_sum"] = cross_entropy.detach().clone()
        num_tokens = mask.sum().to(torch.int)
        metrics["loss_sum"] = loss.detach().clone()
        metrics["tokens"] = num_tokens.detach().clone()
        return loss, num_tokens, metrics


class GKD(Algorithm):
    """Generalized KD: each step the dataset's responses, the student's samples (`lmbda`) or
    the teacher's (`seq_kd`), and the divergence to the teacher on them."""

    def __init__(self, config: JobConfig, vocab_size: int):
        self.lmbda, self.seq_kd, self.seed = config.lmbda, config.seq_kd, config.parallel.seed
        self.samples = config.lmbda > 0 or config.seq_kd
        self.loss = GKDLoss(beta=config.beta, temperature=config.temperature, sft_alpha=config.sft_alpha,
                            topk=config.gkd_logits_topk, vocab_size=vocab_size, opsd_clip=config.opsd_clip)

    def responses(self, context: StepContext, iteration: int) -> Responses:
        if not self.samples:
            return dataset_responses(context)
        examples = context.next_examples()
        source = response_source(self.lmbda, self.seq_kd, self.seed, iteration)
        sums: dict[str, float] = {}
        rollout_logprobs = rollout = None
        metrics = {"on_policy": float(source == "student"), "teacher_sampled": float(source == "teacher")}
        if source != "dataset":
            examples, rollout = context.sample_responses(examples, source, iteration)
            sums = {"sampled_tokens": rollout.num_tokens, "samples": len(rollout.completions)}
            metrics.update(rollout.extra)
        microbatches = context.microbatches(examples)
        if source == "student" and rollout.logprobs is not None:
            rollout_logprobs = context.microbatch_token_values(rollout.logprobs, microbatches)
        return Responses(examples, microbatches, source, sums, metrics, rollout_logprobs)

    def microbatch_loss(self, responses: Responses) -> MicrobatchLoss:
        return functools.partial(self.loss, with_sft=responses.source != "student")

    @property
    def eval_loss(self) -> MicrobatchLoss:
        return functools.partial(self.loss, with_sft=False)
