"""Teacher-student divergences on vocab-sharded logits: forward KL, reverse KL, JSD(beta), top-K.

Hand-written because no library computes them on vocab-sharded logits: TRL's, ms-swift's
and Liger's losses take full-vocab `[N, V]` logits, which under TP means gathering them.

With P_T = softmax(teacher / tau), P_S = softmax(student / tau) over the true vocab:

    beta = 0      forward KL(P_T || P_S)
    beta = 1      reverse KL(P_S || P_T)
    0 < beta < 1  generalized JSD: beta KL(P_T || M) + (1 - beta) KL(P_S || M),
                  M = beta P_T + (1 - beta) P_S

as ms-swift's and TRL's `generalized_jsd_loss` define them. Temperature divides both
logits and the result is NOT multiplied by tau^2 (Hinton's convention); scale the
loss yourself if you want gradients comparable across temperatures.

Full vocab (`vocab_parallel_divergence`): each rank holds `[N, V/tp]`; the softmax
statistics of both models travel in two all-reduces of `[n, 2]` floats and the
divergence in one more; nothing of size V crosses ranks. The backward is written by
hand and needs no collective: with a = dD/dlog p_S, the gradient is
`(a - p_S * sum(a)) / tau`, and sum(a) is known from the forward (forward KL: -1;
reverse KL: D + 1; JSD: (1 - beta) KL(P_S || M)). Softmax math is fp32 whatever the
input dtype, chunk by chunk over tokens; only selected (`mask`) tokens are computed.

Top-K: the teacher's K most likely ids (`sharded_topk`) and the student's logits
there (`ShardedLogProbsAt`) are `[n, K]` tensors, identical on every rank; the
divergence over them is plain autograd math in float64 (`sparse_teacher_divergence`,
also the entry point for a teacher server's top-K logprobs). Normalizations:
    "renorm"  both renormalized over the K ids (ms-swift `gkd_logits_topk`)
    "full"    full-vocab log-probs restricted to the K ids (verl's top-K forward KL); not
              a divergence: it can be negative
    "tail"    the K ids plus one outcome holding each model's remaining mass
              1 - sum_K p; a true divergence over K + 1 outcomes, for every beta
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Optional

import torch

from megatron_opd.ops.logits_source import DenseLogits, LinearLogits
from megatron_opd.ops.token_logprobs import ShardedLogProbsAt
from megatron_opd.ops.topk import sharded_topk
from megatron_opd.ops.vocab_parallel import (
    NEG_INF,
    VocabShard,
    check_ids,
    check_temperature,
    combine_logsumexp,
    compute_dtype,
    flatten_tokens,
    local_max_and_sumexp,
    log_softmax_with,
    row_chunks,
    tempered,
    vocab_shard,
)

TopKNormalize = Literal["renorm", "full", "tail"]
Reduction = Literal["mean", "sum", "none"]
_NORMALIZE = ("renorm", "full", "tail")
_REDUCTIONS = ("mean", "sum", "none")

__all__ = [
    "fused_linear_divergence",
    "fused_linear_sparse_divergence",
    "sparse_teacher_divergence",
    "vocab_parallel_divergence",
]


# ---------------------------------------------------------------------------- the math


def _weighted_log_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_v p_v (log p_v - log q_v) over the last dim, `[..., v]` -> `[...]`. Inputs are finite (-inf is
    NEG_INF, see `vocab_parallel.tempered`), so p = 0 contributes exactly 0."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _log_mixture(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """log M `[..., v]`, M = beta P_T + (1 - beta) P_S (for beta 0 and 1, P_S and P_T themselves)."""
    if beta == 0.0:
        return student_logp
    if beta == 1.0:
        return teacher_logp
    return torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))


def mixture_log_ratios(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float
                       ) -> torch.Tensor:
    """Log-probs `[..., v]` -> `[..., 2]`: KL(P_T || M) and KL(P_S || M) summed over the last dim.

    On a vocab shard these are partial sums; summed across shards they are exact.
    """
    log_m = _log_mixture(student_logp, teacher_logp, beta)
    return torch.stack([_weighted_log_ratio(teacher_logp, log_m),
                        _weighted_log_ratio(student_logp, log_m)], dim=-1)


def combine_divergence(kl_terms: torch.Tensor, beta: float) -> torch.Tensor:
    """The divergence from `mixture_log_ratios` (`[..., 2]` -> `[...]`)."""
    teacher_term, student_term = kl_terms[..., 0], kl_terms[..., 1]
    if beta == 0.0:
        return teacher_term
    if beta == 1.0:
        return student_term
    return beta * teacher_term + (1.0 - beta) * student_term


def _student_logp_grad(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float
                       ) -> torch.Tensor:
    """a = dD / dlog p_S `[..., v]`, entrywise (p_S, p_T as functions of their log-probs)."""
    if beta == 0.0:
        return -teacher_logp.exp()
    log_ratio = student_logp - _log_mixture(student_logp, teacher_logp, beta)
    if beta == 1.0:
        return student_logp.exp() * (log_ratio + 1.0)
    return (1.0 - beta) * student_logp.exp() * log_ratio


def _sum_of_student_logp_grad(divergence: torch.Tensor, kl_terms: torch.Tensor, beta: float
                              ) -> torch.Tensor:
    """sum_v a_v over the full vocab `[n]`, from forward results (sum p = 1)."""
    if beta == 0.0:
        return torch.full_like(divergence, -1.0)
    if beta == 1.0:
        return divergence + 1.0
    return (1.0 - beta) * kl_terms[..., 1]


# ------------------------------------------------------------------------- full vocab


class _FullVocabDivergence(torch.autograd.Function):
    """Per selected token D(P_T, P_S) -> `[n]`, from logits sources (see `logits_source`):
    the student's built by `make_student(*student_tensors)` (gradients flow to those
    tensors), the teacher's given as an object (no gradient)."""

    @staticmethod
    def forward(ctx, rows, shard: VocabShard, beta: float, tau: float, chunk_size: Optional[int],
                teacher, make_student, *student_tensors):
        student = make_student(*student_tensors)
        chunks = list(row_chunks(rows, student.num_rows, shard.local_vocab, chunk_size))
        maxes, sums = [], []
        for _, src in chunks:
            stats = [local_max_and_sumexp(tempered(source.chunk(src), shard, tau)) for source in (student, teacher)]
            maxes.append(torch.stack([stats[0][0], stats[1][0]], -1))
            sums.append(torch.stack([stats[0][1], stats[1][1]], -1))
        empty = torch.empty(0, 2, dtype=compute_dtype(student.dtype), device=student.device)
        (shift, log_total), _ = combine_logsumexp(shard, torch.cat(maxes) if maxes else empty,
                                                  torch.cat(sums) if sums else empty)  # [n, 2] each
        kl_terms = []
        for out, src in chunks:
            student_logp = log_softmax_with(tempered(student.chunk(src), shard, tau), shift[out, 0], log_total[out, 0])
            teacher_logp = log_softmax_with(tempered(teacher.chunk(src), shard, tau), shift[out, 1], log_total[out, 1])
            kl_terms.append(mixture_log_ratios(student_logp, teacher_logp, beta))
        kl_terms = shard.all_reduce(torch.cat(kl_terms) if kl_terms else empty)
        divergence = combine_divergence(kl_terms, beta)
        ctx.save_for_backward(rows, shift, log_total, kl_terms, divergence, *student_tensors)
        ctx.shard, ctx.beta, ctx.tau, ctx.chunk_size = shard, beta, tau, chunk_size
        ctx.teacher, ctx.make_student = teacher, make_student
        # A true divergence: rounding must not make it negative (identical models give ~-1e-8).
        return divergence.clamp(min=0.0)

    @staticmethod
    def backward(ctx, grad_divergence):
        rows, shift, log_total, kl_terms, divergence, *student_tensors = ctx.saved_tensors
        student, teacher = ctx.make_student(*student_tensors), ctx.teacher
        shard, beta, tau = ctx.shard, ctx.beta, ctx.tau
        student.start_backward(shift.dtype)
        grad_sum = _sum_of_student_logp_grad(divergence, kl_terms, beta)
        scale = grad_divergence.to(shift.dtype) / tau
        for out, src in row_chunks(rows, student.num_rows, shard.local_vocab, ctx.chunk_size):
            student_logp = log_softmax_with(tempered(student.chunk(src), shard, tau), shift[out, 0], log_total[out, 0])
            teacher_logp = log_softmax_with(tempered(teacher.chunk(src), shard, tau), shift[out, 1], log_total[out, 1])
            logp_grad = _student_logp_grad(student_logp, teacher_logp, beta)
            chunk_grad = logp_grad - student_logp.exp() * grad_sum[out].unsqueeze(-1)
            student.add_chunk_grad(src, chunk_grad * scale[out].unsqueeze(-1))
        return (None,) * 7 + student.grads()


# ----------------------------------------------------------------------------- top-K


def _with_tail(logp: torch.Tensor) -> torch.Tensor:
    """`[n, K]` -> `[n, K + 1]`: log(1 - sum exp(logp)) appended as outcome K + 1, for a teacher known only at K ids
    (float64, clamped away from log 0)."""
    mass = torch.logsumexp(logp, dim=-1, keepdim=True).clamp(max=-1e-12)
    return torch.cat([logp, torch.log(-torch.expm1(mass)).clamp(min=NEG_INF)], dim=-1)


def _sparse_divergence(make_student, student_tensors, local_vocab: int, token_shape: torch.Size,
                       teacher_logp: torch.Tensor, teacher_ids: torch.Tensor, *, beta, temperature,
                       normalize, vocab_size, mask, reduction, tp_group, chunk_size) -> torch.Tensor:
    """Divergence over the teacher's K ids (+ tail): `teacher_logp` `[..., K]` or `[..., K + 1]`."""
    _check_common(beta, temperature, reduction)
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize={normalize!r} is invalid: one of {list(_NORMALIZE)}")
    num_k = teacher_ids.shape[-1]
    given_tail = normalize == "tail" and teacher_logp.shape[-1] == num_k + 1
    if (teacher_ids.shape[:-1] != token_shape or teacher_logp.shape[:-1] != token_shape
            or teacher_logp.shape[-1] != num_k + given_tail):
        raise ValueError(f"teacher_topk_logprobs {tuple(teacher_logp.shape)} and teacher_topk_ids "
                         f"{tuple(teacher_ids.shape)} must both be [..., K] over tokens {tuple(token_shape)}"
                         " (logprobs may be [..., K + 1] with the tail for normalize='tail')")
    shard = vocab_shard(local_vocab, vocab_size, tp_group)
    ids = teacher_ids.reshape(-1, num_k).long()
    teacher_logp = teacher_logp.detach().reshape(-1, teacher_logp.shape[-1])
    rows = _selected_rows(mask, token_shape, ids.device)
    if rows is not None:
        ids, teacher_logp = ids[rows], teacher_logp[rows]
    check_ids(ids, shard, "teacher_topk_ids")
    student_logp = ShardedLogProbsAt.apply(ids, rows, shard, float(temperature), normalize != "renorm",
                                           normalize == "tail", chunk_size, make_student,
                                           *student_tensors).double()
    teacher_logp = teacher_logp.double().clamp(min=NEG_INF)
    if normalize == "renorm":
        student_logp = torch.log_softmax(student_logp, dim=-1)
        teacher_logp = torch.log_softmax(teacher_logp, dim=-1)
    elif normalize == "tail" and not given_tail:
        teacher_logp = _with_tail(teacher_logp)
    per_row = combine_divergence(mixture_log_ratios(student_logp, teacher_logp, beta), beta)
    if normalize != "full":  # a true divergence there; "full" may legitimately be negative
        per_row = per_row.clamp(min=0.0)
    return _reduce(per_row.to(compute_dtype(student_tensors[0].dtype)), rows, token_shape, reduction)


# ----------------------------------------------------------------------- public API


def _check_common(beta: float, temperature: float, reduction: str) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} is invalid: must be in [0, 1]")
    check_temperature(temperature)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is invalid: one of {list(_REDUCTIONS)}")


def _selected_rows(mask: Optional[torch.Tensor], token_shape: torch.Size, device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if mask.shape != token_shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the token shape {tuple(token_shape)}")
    return mask.reshape(-1).to(device=device, dtype=torch.bool).nonzero().squeeze(-1)


def _reduce(per_row: torch.Tensor, rows: Optional[torch.Tensor], token_shape: torch.Size,
            reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / max(per_row.numel(), 1)
    if rows is None:
        return per_row.view(token_shape)
    full = per_row.new_zeros(token_shape.numel())
    return full.index_put((rows,), per_row).view(token_shape)


def _divergence(make_student, student_tensors, teacher, token_shape: torch.Size, *, beta, temperature,
                topk, topk_normalize, vocab_size, mask, reduction, tp_group, chunk_size) -> torch.Tensor:
    """The shared body of `vocab_parallel_divergence` and `fused_linear_divergence`."""
    _check_common(beta, temperature, reduction)
    local_vocab = teacher.local_vocab
    shard = vocab_shard(local_vocab, vocab_size, tp_group)
    if topk is not None:
        if not 1 <= topk <= shard.vocab_size:
            raise ValueError(f"topk={topk!r} is invalid: must be in [1, vocab_size={shard.vocab_size}]")
        if topk_normalize not in _NORMALIZE:
            raise ValueError(f"topk_normalize={topk_normalize!r} is invalid: one of {list(_NORMALIZE)}")
        with torch.no_grad():
            teacher_logp, ids = sharded_topk(teacher, topk, shard, float(temperature), chunk_size)
            # "renorm" needs only the tempered logits: a per-token shift cancels.
            if topk_normalize != "renorm":
                teacher_logp = ShardedLogProbsAt.apply(ids, None, shard, float(temperature), True,
                                                       topk_normalize == "tail", chunk_size,
                                                       teacher.rebuild(), *teacher.tensors)
        return _sparse_divergence(
            make_student, student_tensors, local_vocab, token_shape, teacher_logp.view(*token_shape, -1),
            ids.view(*token_shape, topk), beta=beta, temperature=temperature, normalize=topk_normalize,
            vocab_size=shard.vocab_size, mask=mask, reduction=reduction, tp_group=shard.group,
            chunk_size=chunk_size)
    rows = _selected_rows(mask, token_shape, teacher.device)
    per_row = _FullVocabDivergence.apply(rows, shard, float(beta), float(temperature), chunk_size, teacher,
                                         make_student, *student_tensors)
    return _reduce(per_row, rows, token_shape, reduction)


def sparse_teacher_divergence(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    normalize: TopKNormalize = "renorm",
    vocab_size: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
    reduction: Reduction = "mean",
    tp_group=None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Divergence of the student from a teacher known only at K ids per token.

    `student_logits` `[..., V/tp]` (this rank's shard); `teacher_topk_logprobs`,
    `teacher_topk_ids` `[..., K]`, the same on every TP rank: the teacher's full-vocab
    log-probabilities at the distillation temperature, over global ids. For "tail" the
    logprobs may carry a K+1-th column, log of the teacher's mass outside the K ids
    (exact where the caller has the full teacher; otherwise it is 1 - sum_K p). For "renorm"
    any per-token constant is irrelevant, so tempered logits also do; a server that
    returns logprobs at temperature 1 gives exact "renorm" inputs as `logprobs / tau`.
    `temperature` divides the student logits. Gradient flows to `student_logits` only.
    """
    return _sparse_divergence(
        DenseLogits, (flatten_tokens(student_logits),), student_logits.shape[-1], student_logits.shape[:-1],
        teacher_topk_logprobs, teacher_topk_ids, beta=beta, temperature=temperature, normalize=normalize,
        vocab_size=vocab_size, mask=mask, reduction=reduction, tp_group=tp_group, chunk_size=chunk_size)


def vocab_parallel_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    topk: Optional[int] = None,
    topk_normalize: TopKNormalize = "renorm",
    vocab_size: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
    reduction: Reduction = "mean",
    tp_group=None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Divergence between teacher and student on this rank's vocab shard `[..., V/tp]`.

    `mask` `[...]`: True where the token counts. `vocab_size`: ids >= it are padding,
    excluded from both distributions. `reduction`: "mean" over counted tokens (0 when
    none count), "sum", or "none" (`[...]` fp32, 0 at masked tokens). `tp_group=None`:
    Megatron's TP group when initialized, else no TP. `chunk_size`: tokens per chunk.
    Gradient flows to `student_logits` only; the value is the same on every TP rank.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (pad both vocabs "
                         "to one common size)")
    return _divergence(
        DenseLogits, (flatten_tokens(student_logits),), DenseLogits(flatten_tokens(teacher_logits.detach())),
        student_logits.shape[:-1], beta=beta, temperature=temperature, topk=topk,
        topk_normalize=topk_normalize, vocab_size=vocab_size, mask=mask, reduction=reduction,
        tp_group=tp_group, chunk_size=chunk_size)


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    topk: Optional[int] = None,
    topk_normalize: TopKNormalize = "renorm",
    vocab_size: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
    reduction: Reduction = "mean",
    tp_group=None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """`vocab_parallel_divergence(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T)`
    without ever holding the `[N, V/tp]` logits for all N.

    Hidden states `[N, H]` (teacher and student may differ in H), LM-head shards
    `[V/tp, H]` (row-sharded as Megatron's output layer). Logits are computed chunk by
    chunk, again in the backward, which returns gradients for `student_hidden` and
    `student_weight`. With sequence parallelism, gather the hidden states along the
    sequence first, as Megatron's output layer does.
    """
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1] or student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} / head {tuple(student_weight.shape)} and "
                         f"teacher hidden {tuple(teacher_hidden.shape)} / head {tuple(teacher_weight.shape)} "
                         "must have the same tokens and the same vocab shard size")
    teacher = LinearLogits(flatten_tokens(teacher_hidden.detach()), teacher_weight.detach(), chunk_size)
    return _divergence(
        functools.partial(LinearLogits, chunk_rows=chunk_size), (flatten_tokens(student_hidden), student_weight),
        teacher, student_hidden.shape[:-1],
        beta=beta, temperature=temperature, topk=topk, topk_normalize=topk_normalize, vocab_size=vocab_size,
        mask=mask, reduction=reduction, tp_group=tp_group, chunk_size=chunk_size)


def fused_linear_sparse_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    normalize: TopKNormalize = "renorm",
    vocab_size: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
    reduction: Reduction = "mean",
    tp_group=None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """`sparse_teacher_divergence(student_hidden @ student_weight.T, ...)` without holding the
    student's `[N, V/tp]` logits: hidden `[N, H]`, LM-head shard `[V/tp, H]`, the teacher's
    `[N, K]` log-probabilities and global ids (a teacher server's or the teacher cache's
    answer). Gradients flow to `student_hidden` and `student_weight`.
    """
    return _sparse_divergence(
        functools.partial(LinearLogits, chunk_rows=chunk_size), (flatten_tokens(student_hidden), student_weight),
        student_weight.shape[0], student_hidden.shape[:-1], teacher_topk_logprobs, teacher_topk_ids, beta=beta,
        temperature=temperature, normalize=normalize, vocab_size=vocab_size, mask=mask, reduction=reduction,
        tp_group=tp_group, chunk_size=chunk_size)
