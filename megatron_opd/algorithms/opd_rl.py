"""OPD-RL: GRPO over student rollouts, with the teacher's log-ratio added to each token's advantage.

Per rollout batch: `num_generations` samples per prompt from the student; each sample's
rewards (`algorithms.rewards`, summed over the reward functions; none: 0) are
normalized within its group of G samples,

    A_base = (r - mean_group(r)) / (std_group(r) + 1e-4)        (std with Bessel's correction)

and after normalization every response token gets the teacher's signal (detached),

    A_t = A_base + teacher_kl_coef * (log p_T(y_t) - log p_old(y_t))

where p_old is the student that sampled the rollout. The loss is PPO's clipped
importance ratio, r_t = p(y_t) / p_old(y_t),

    loss = sum over response tokens of  -min(r_t * A_t, clip(r_t, 1 - epsilon, 1 + epsilon_high) * A_t)

summed and divided once by the global batch's response-token count ("token-mean",
as DAPO and TRL's `loss_type="dapo"`: every token weighs the same, long responses are
not down-weighted). Its alternatives, not offered here: GRPO's per-sequence mean then
mean over sequences (favours short responses), Dr. GRPO's division by a constant
(`max_completion_length`). Without reward functions A_base = 0 and the teacher's
log-ratio is the only signal: pure on-policy distillation by reverse KL, whose k1
estimator it is. The logged `teacher_kl` is the k3 estimator e^d - d - 1 with
d = log p_T - log p_old (non-negative, unbiased for KL(student || teacher)).

Truncated importance sampling (verl's TIS, `rollout_importance_sampling_cap`): when another
engine (vLLM) sampled the rollout, its kernels give p_rollout != p_old for the same
weights, and the samples are off-policy by that much. Each token's loss is then weighted
by the detached, capped ratio

    w_t = min(p_old(y_t) / p_rollout(y_t), cap)

Log-probabilities are of the tempered distributions (logits / `temperature`, the
distribution the sampler draws from), for the student and the teacher alike.

Shapes: one microbatch's response tokens are flattened in row-major order to `[N]`
(N = its loss-mask count); rewards and base advantages are per sequence `[B]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_opd.ops import fused_linear_token_logprobs
from megatron_opd.teachers.outputs import as_mix, sums_by_teacher

GROUP_STD_EPSILON = 1e-4  # as TRL: a group of equal rewards gets advantage 0, not 0/0


def group_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """`[B]` summed rewards, consecutive groups of `num_generations` samples of one prompt ->
    `[B]` group-normalized advantages (float64 math, returned as float32)."""
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of "
                         f"num_generations={num_generations}")
    if num_generations < 2:
        raise ValueError(f"num_generations={num_generations} is invalid: a group needs >= 2 samples")
    grouped = rewards.double().view(-1, num_generations)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    return (centered / (grouped.std(dim=1, keepdim=True) + GROUP_STD_EPSILON)).view(-1).float()


def token_advantages(base_advantages: torch.Tensor, teacher_logprobs: Optional[torch.Tensor],
                     old_logprobs: torch.Tensor, teacher_kl_coef: float,
                     opsd_clip: Optional[float] = None) -> torch.Tensor:
    """`[N]` per-token advantages A_base + coef * (log p_T - log p_old), detached.
    `teacher_logprobs` None (no teacher): A_base alone. `opsd_clip` (teacher: self):
    the log-ratio clamped to [-opsd_clip, opsd_clip] first."""
    if teacher_logprobs is None or teacher_kl_coef == 0:
        return base_advantages.detach().float()
    log_ratio = teacher_logprobs - old_logprobs
    if opsd_clip is not None:
        log_ratio = log_ratio.clamp(-opsd_clip, opsd_clip)
    return (base_advantages + teacher_kl_coef * log_ratio).detach().float()


def teacher_kl_k3(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """`[N]` k3 estimates e^d - d - 1 of KL(student || teacher), d = log p_T - log p_S."""
    log_ratio = (teacher_logprobs - student_logprobs).double()
    return (torch.expm1(log_ratio) - log_ratio).float()


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        epsilon: float, epsilon_high: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate per token `[N]` (differentiable in `logprobs`), and the sums of
    tokens clipped at the low bound (ratio < 1 - eps, A < 0) and the high one (ratio > 1 + eps_high, A > 0)."""
    ratio = torch.exp(logprobs - old_logprobs.detach())
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    per_token = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (advantages < 0)).sum()
        high = ((ratio > 1 + epsilon_high) & (advantages > 0)).sum()
    return per_token, {"clip_low_sum": low.double(), "clip_high_sum": high.double()}


def truncated_importance_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """`[N]` TIS weights min(p_old / p_rollout, cap), detached."""
    return torch.exp(old_logprobs.detach().double() - rollout_logprobs.double()).clamp(max=cap).float()


@dataclass
class RolloutTokens:
    """What a microbatch's loss needs from its rollout, on the last stage; all `[N]`."""

    base_advantages: torch.Tensor  # each token's sequence A_base
    teacher_logprobs: Optional[torch.Tensor]  # log p_T(y_t); None without a teacher
    old_logprobs: Optional[torch.Tensor]  # log p_old(y_t); None: this step's own (num_iterations == 1)
    rollout_logprobs: Optional[torch.Tensor] = None  # log p_rollout(y_t) of the sampling engine (vLLM)
    # (teacher name, its tokens' positions [n] or None for all) per teacher of a multi-teacher run
    teacher_groups: list = field(default_factory=list)


@dataclass(frozen=True)
class OPDRLLoss:
    epsilon: float
    epsilon_high: Optional[float]  # None: epsilon
    teacher_kl_coef: float
    temperature: float
    vocab_size: int
    opsd_clip: Optional[float] = None  # teacher: self: |log-ratio| at most this
    importance_sampling_cap: Optional[float] = None  # TIS's cap; None: off

    def __call__(self, student_hidden: torch.Tensor, student_head: torch.Tensor, labels: torch.Tensor,
                 loss_mask: torch.Tensor, rollout: RolloutTokens, with_sft: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Summed loss, counted tokens and metric sums for one microbatch.

        student_hidden `[b, s, H]` (after `models.outputs.head_input`), student_head
        `[V/tp, H]`, labels and loss_mask `[b, s]`; `rollout` over the mask's `[N]` tokens.
        """
        mask = loss_mask.bool()
        logprobs = fused_linear_token_logprobs(student_hidden[mask], student_head, labels[mask],
                                               temperature=self.temperature, vocab_size=self.vocab_size)
        old_logprobs = rollout.old_logprobs if rollout.old_logprobs is not None else logprobs.detach()
        advantages = token_advantages(rollout.base_advantages, rollout.teacher_logprobs, old_logprobs,
                                      self.teacher_kl_coef, self.opsd_clip)
        epsilon_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        per_token, metrics = clipped_policy_loss(logprobs, old_logprobs, advantages, self.epsilon, epsilon_high)
        if self.importance_sampling_cap is not None:
            if rollout.rollout_logprobs is None:
                raise ValueError("rollout_importance_sampling_cap is set but the rollout engine returned no "
                                 "log-probs of its samples (only rollout.engine: vllm does)")
            weights = truncated_importance_weights(old_logprobs, rollout.rollout_logprobs, self.importance_sampling_cap)
            per_token = per_token * weights
            metrics["importance_weight_sum"] = weights.double().sum()
            metrics["importance_capped_sum"] = (weights >= self.importance_sampling_cap).double().sum()
        loss = per_token.sum()
        num_tokens = mask.sum().to(torch.int)
        metrics.update(loss_sum=loss.detach().clone(), advantage_sum=advantages.double().sum(),
                       tokens=num_tokens.detach().clone())
        if rollout.teacher_logprobs is not None:
            teacher_kl = teacher_kl_k3(rollout.teacher_logprobs, old_logprobs).double()
            metrics["teacher_kl_sum"] = teacher_kl.sum()
            metrics.update(sums_by_teacher(rollout.teacher_groups, {"teacher_kl": teacher_kl, "loss": per_token}))
        return loss, num_tokens, metrics


@dataclass(frozen=True)
class TeacherKL:
    """An evaluation loss: OPD-RL's `teacher_kl` (k3, per response token) of the student's
    current distribution against the teacher's output (`teachers.outputs`),
    for `Trainer.evaluate(loss=TeacherKL(...), sample=True)` on held-out prompts. Each token at
    its row's teacher temperature (`temperature`: of a bare teacher answer)."""

    temperature: float
    vocab_size: int

    def __call__(self, student_hidden: torch.Tensor, student_head: torch.Tensor, labels: torch.Tensor,
                 loss_mask: torch.Tensor, teacher, with_sft: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        mask = loss_mask.bool()
        targets, hidden = labels[mask], student_hidden[mask]
        mix = as_mix(teacher, self.temperature, None)
        student = mix.per_part(lambda part, rows: fused_linear_token_logprobs(
            rows(hidden), student_head, rows(targets), temperature=part.temperature, vocab_size=self.vocab_size))
        teacher_logprobs = mix.token_logprobs(targets, vocab_size=self.vocab_size)
        per_token = teacher_kl_k3(teacher_logprobs, student).double()
        kl = per_token.sum()
        num_tokens = mask.sum().to(torch.int)
        return kl, num_tokens, {"teacher_kl_sum": kl.detach().clone(), "tokens": num_tokens.detach().clone(),
                                **sums_by_teacher(mix.groups(), {"teacher_kl": per_token})}
