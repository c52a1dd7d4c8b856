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

import concurrent.futures
import functools
import math
import threading
from typing import Literal, Optional

import torch
import torch.distributed as dist

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
    row_chunks,
    vocab_shard,
    without_padding,
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

# fp32 elements per chunk buffer (1 MiB): the three buffers of a KL chunk stay in a core's
# L2 cache (4 MiB here) while a dozen elementwise passes run over them. At least one row.
CHUNK_ELEMENTS = 1 << 18


# fp32 elements per logits block of the fused LM-head path (32 MiB; 256 rows at V/tp = 32k,
# 64 at 152k): the head is read once per block, by four matmuls.
LINEAR_BLOCK_ELEMENTS = 1 << 23


class _ChunkBuffers:
    """`count` compute-dtype buffers `[rows, V/tp]`, allocated once per call and reused by every
    chunk: no chunk-sized allocation per chunk (a masked call's row gathers used to grow the heap
    by ~1.4 GB at N=1024, V=152k), and the working set stays cache-sized."""

    def __init__(self, count: int, rows: int, shard: VocabShard, dtype: torch.dtype, device):
        self.buffers = [torch.empty(rows, shard.computed_columns, dtype=dtype, device=device) for _ in range(count)]

    def take(self, rows: int) -> list[torch.Tensor]:
        return [buffer[:rows] for buffer in self.buffers]


def _each_chunk(chunks, body, count: int, step: int, shard: VocabShard, dtype, device, parallel: bool) -> None:
    """`body(out, src, buffers)` for every chunk, `buffers` `count` x `[rows, V/tp]`.

    With several intra-op threads and `parallel` (bodies that write disjoint rows only), the
    chunks are shared out among as many workers, each running its ops on one thread: a dozen
    small ops per chunk, each its own OpenMP region ending in a barrier, made the kernel 10-25x
    slower with 2 threads on a loaded 2-core machine (a thread spinning at every barrier for a
    descheduled peer); workers that take the next chunk when done wait only once, at the end.
    Every op is then single-threaded, so results do not depend on the thread count. Only on
    CPU: on CUDA the ops run on the device whatever the host threads, and a new host thread
    would start on CUDA device 0 with its own current stream.
    """
    threads = torch.get_num_threads()
    if not parallel or threads == 1 or len(chunks) < 2 or torch.device(device).type != "cpu":
        buffers = _ChunkBuffers(count, step, shard, dtype, device)
        for out, src in chunks:
            body(out, src, buffers.take(out.stop - out.start))
        return
    queue = iter(chunks)
    lock = threading.Lock()

    def worker() -> None:
        torch.set_num_threads(1)  # this thread's OpenMP setting
        buffers = _ChunkBuffers(count, step, shard, dtype, device)
        while True:
            with lock:
                item = next(queue, None)
            if item is None:
                return
            out, src = item
            with torch.no_grad():  # grad mode is per thread; autograd.Function bodies run without it
                body(out, src, buffers.take(out.stop - out.start))

    try:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(worker) for _ in range(threads)]:
                future.result()
    finally:
        torch.set_num_threads(threads)  # the workers changed the process-wide default


def _read_tempered(source, src, shard: VocabShard, tau: float, out: torch.Tensor) -> torch.Tensor:
    """`tempered(source.chunk(src))` written into `out` `[rows, V/tp]`: logits / tau in the compute
    dtype, -inf and padding ids at NEG_INF (same values as `vocab_parallel.tempered`)."""
    if tau == 1.0 and isinstance(source, DenseLogits) and isinstance(src, slice) and source.dtype == out.dtype:
        torch.clamp(source.logits[src], min=NEG_INF, out=out)  # one pass: read, convert, clamp
    else:
        source.read_chunk(src, out)
        if tau != 1.0:
            out.div_(tau)
        out.clamp_(min=NEG_INF)
    if shard.valid_local < shard.computed_columns:  # a shard of padding only
        out[:, shard.valid_local:] = NEG_INF
    return out


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a_v b_v per row, `[rows, v]` x2 -> `[rows]`; overwrites `b` (einsum's batched matmul is
    ten times slower here)."""
    return b.mul_(a).sum(dim=-1)


def _rows_apart(*sources) -> bool:
    """Whether chunks may run concurrently: dense logits (a chunk reads and writes its own rows); an LM
    head's weight gradient is one sum over all chunks, and its matmuls use the threads themselves."""
    return all(isinstance(source, DenseLogits) for source in sources)


def _chunk_rows(chunk_size: Optional[int], source, shard: VocabShard) -> int:
    if chunk_size is not None:
        return chunk_size
    if isinstance(source, LinearLogits):
        # The LM head is re-read for every block: thin blocks make the matmuls bandwidth-bound.
        return max(source.chunk_rows, LINEAR_BLOCK_ELEMENTS // max(1, shard.computed_columns))
    return max(1, CHUNK_ELEMENTS // max(1, shard.computed_columns))


class _FullVocabDivergence(torch.autograd.Function):
    """Per selected token D(P_T, P_S) -> `[n]`, from logits sources (see `logits_source`):
    the student's built by `make_student(*student_tensors)` (gradients flow to those
    tensors), the teacher's given as an object (no gradient).

    KL (beta 0 or 1) without TP in one pass over the chunks: with P the weighting model (teacher for
    forward KL, student for reverse) and Q the other, x_P, x_Q this shard's tempered logits
    less their local max, the pass keeps per row max, sum e^x_P, sum e^x_Q and
    w = sum e^x_P (x_P - x_Q), the exponentials reused. Rescaled to the global max and
    summed: KL = W / Z_P - log Z_P + log Z_Q. JSD needs normalized P_S, P_T for log M: without
    TP in one pass as well (`_one_pass_jsd`); under TP the global normalizers come first (see
    `forward`): a statistics pass, then the divergence pass.
    """

    @staticmethod
    def forward(ctx, rows, shard: VocabShard, beta: float, tau: float, chunk_size: Optional[int],
                teacher, make_student, *student_tensors):
        student = make_student(*student_tensors)
        dtype = compute_dtype(student.dtype)
        step = _chunk_rows(chunk_size, student, shard)
        ctx.unit_grads = None
        chunks = list(row_chunks(rows, student.num_rows, shard.computed_columns, step))
        num = student.num_rows if rows is None else rows.numel()
        if beta in (0.0, 1.0) and shard.size == 1:
            weighting, other = (teacher, student) if beta == 0.0 else (student, teacher)
            # An LM head's gradient in the same pass (forward KL): the backward then only scales it,
            # instead of computing every logits block a second time.
            if beta == 0.0 and isinstance(student, LinearLogits) and any(ctx.needs_input_grad[7:]):
                student.start_backward(dtype)
                ctx.unit_grads = student
            stats = _one_pass_kl(chunks, num, weighting, other, shard, tau, step, dtype, ctx.unit_grads)
            # [n, 2] each (column 0: the student, 1: the teacher), the KL [n]
            shift, log_total, divergence = _combine_one_pass_kl(shard, stats, student_first=beta == 1.0)
            kl_terms = None
        elif shard.size == 1:  # JSD without TP: this shard's normalizers are the full vocab's
            shift, log_total, kl_terms = _one_pass_jsd(chunks, num, student, teacher, shard, tau, step, dtype, beta)
            divergence = combine_divergence(kl_terms, beta)
        else:
            # Under TP the statistics first: the KL terms are then summed from the same rounded
            # log-probs the backward recomputes (a one-pass combine would add offsets of the
            # logits' magnitude, rounding at 1e-3 for |logits| ~ 1e4).
            shift, log_total = _normalizers(chunks, num, student, teacher, shard, tau, step, dtype)
            kl_terms = shard.all_reduce(_divergence_terms(chunks, num, student, teacher, shard, tau, step, dtype,
                                                          shift, log_total, beta))
            divergence = combine_divergence(kl_terms, beta)
        ctx.save_for_backward(rows, shift, log_total, kl_terms, divergence, *student_tensors)
        ctx.shard, ctx.beta, ctx.tau, ctx.step = shard, beta, tau, step
        ctx.teacher, ctx.make_student = teacher, make_student
        # A true divergence: rounding must not make it negative (identical models give ~-1e-8).
        return divergence.clamp(min=0.0)

    @staticmethod
    def backward(ctx, grad_divergence):
        rows, shift, log_total, kl_terms, divergence, *student_tensors = ctx.saved_tensors
        student, teacher = ctx.make_student(*student_tensors), ctx.teacher
        shard, beta, tau, step = ctx.shard, ctx.beta, ctx.tau, ctx.step
        dtype = shift.dtype
        factor = grad_divergence.to(dtype) / tau
        if ctx.unit_grads is not None and (factor == factor[:1]).all():  # "sum" / "mean": one g for all rows
            unit_grads, ctx.unit_grads = ctx.unit_grads, None  # scaled in place: a second backward recomputes
            unit_grads.scale_grads(factor[0] if factor.numel() else 0.0)
            return (None,) * 7 + unit_grads.grads()
        student.start_grad_writes(dtype, every_row=rows is None)
        # dL/dz_S = g (a - P_S sum a) / tau, per row factor g / tau
        scale = grad_divergence.to(dtype) / tau

        def body(out, src, buffers):
            if beta == 0.0:  # a = -P_T, sum a = -1: g (P_S - P_T) / tau
                x_s, x_t, _ = buffers
                p_s = _probs(_read_tempered(student, src, shard, tau, x_s), shift[out, 0], log_total[out, 0])
                p_t = _probs(_read_tempered(teacher, src, shard, tau, x_t), shift[out, 1], log_total[out, 1])
                grad = p_s.sub_(p_t).mul_(scale[out].unsqueeze(-1))
            elif beta == 1.0:  # a = P_S (log P_S - log P_T + 1), sum a = D + 1: g P_S (log P_S - log P_T - D) / tau
                log_s, log_t, p_s = buffers
                _log_probs(student, src, shard, tau, shift[out, 0], log_total[out, 0], log_s)
                _log_probs(teacher, src, shard, tau, shift[out, 1], log_total[out, 1], log_t)
                torch.exp(log_s, out=p_s)
                grad = log_s.sub_(log_t).sub_(divergence[out].unsqueeze(-1)).mul_(p_s)
                grad.mul_(scale[out].unsqueeze(-1))
            else:  # a = (1 - beta) P_S (log P_S - log M), sum a = (1 - beta) S
                log_s, log_t, p_s, p_t, log_m = buffers
                _jsd_chunk(student, teacher, src, shard, tau, shift[out], log_total[out], beta,
                           log_s, log_t, p_s, p_t, log_m)
                grad = log_s.sub_(log_m).sub_(kl_terms[out, 1].unsqueeze(-1)).mul_(p_s)
                grad.mul_(((1.0 - beta) * scale[out]).unsqueeze(-1))
            student.write_chunk_grad(src, grad)

        _each_chunk(list(row_chunks(rows, student.num_rows, shard.computed_columns, step)), body,
                    3 if beta in (0.0, 1.0) else 5, step, shard, dtype, shift.device, _rows_apart(student))
        return (None,) * 7 + student.grads()


def _probs(x: torch.Tensor, shift: torch.Tensor, log_total: torch.Tensor) -> torch.Tensor:
    """P in place of tempered logits `x` `[rows, v]`: exp(x - shift) / Z (x - shift rounds exactly
    near the max; exp(-log Z) is one per-row factor)."""
    return x.sub_(shift.unsqueeze(-1)).exp_().mul_(torch.exp(-log_total).unsqueeze(-1))


def _one_pass_kl(chunks, num: int, weighting, other, shard, tau, step, dtype, student_grad=None) -> torch.Tensor:
    """Per row local `[n, 5]`: max and sum exp of P's logits, of Q's, and w = sum e^x_P (x_P - x_Q)
    (x less its local max). `student_grad` (forward KL without TP, Q the student): the gradient of
    sum over rows of KL * tau, P_S - P_T per chunk, handed to its `add_chunk_grad` as Liger does."""
    stats = torch.empty(num, 5, dtype=dtype, device=weighting.device)

    def body(out, src, buffers):
        p, q, exp = buffers[:3]
        for col, x, source in ((0, p, weighting), (2, q, other)):
            _read_tempered(source, src, shard, tau, x)
            stats[out, col] = x.amax(dim=-1)
            x.sub_(stats[out, col].unsqueeze(-1))
        exp_q = exp if student_grad is None else buffers[3]
        stats[out, 3] = torch.exp(q, out=exp_q).sum(dim=-1)
        stats[out, 1] = torch.exp(p, out=exp).sum(dim=-1)
        stats[out, 4] = _row_dot(exp, p.sub_(q))
        if student_grad is not None:  # the local sums are the full vocab's without TP
            exp.div_(stats[out, 1].unsqueeze(-1))
            student_grad.add_chunk_grad(src, exp_q.div_(stats[out, 3].unsqueeze(-1)).sub_(exp))

    _each_chunk(chunks, body, 3 if student_grad is None else 4, step, shard, dtype, weighting.device,
                student_grad is None and _rows_apart(weighting, other))
    return stats


def _combine_one_pass_kl(shard: VocabShard, stats: torch.Tensor, student_first: bool):
    """Local `_one_pass_kl` stats -> the normalizers `(shift, log_total)` `[n, 2]` each (student,
    teacher) and KL(P || Q) `[n]`, in one MAX and one SUM all-reduce."""
    local_max = stats[:, [0, 2]]  # [n, 2]: P, Q
    shift = shard.all_reduce(local_max.clone(), dist.ReduceOp.MAX)
    offset = local_max - shift  # <= 0
    scale = offset.exp()
    sums = stats[:, [1, 3]] * scale
    # sum over this shard of e^(x - shift_P) ((x_P - shift_P) - (x_Q - shift_Q))
    weighted = scale[:, 0] * (stats[:, 4] + stats[:, 1] * (offset[:, 0] - offset[:, 1]))
    totals = shard.all_reduce(torch.cat([sums, weighted.unsqueeze(-1)], dim=-1))
    log_total = totals[:, :2].log()
    divergence = totals[:, 2] / totals[:, 0] - log_total[:, 0] + log_total[:, 1]
    order = [0, 1] if student_first else [1, 0]
    return shift[:, order], log_total[:, order], divergence


def _normalizers(chunks, num: int, student, teacher, shard, tau, step, dtype):
    """`(shift, log_total)` `[n, 2]` each (student, teacher) over the full vocab."""
    maxes = torch.empty(num, 2, dtype=dtype, device=student.device)
    sums = torch.empty_like(maxes)

    def body(out, src, buffers):
        x, e = buffers
        for col, source in enumerate((student, teacher)):
            chunk = _read_tempered(source, src, shard, tau, x)
            maxes[out, col] = chunk.amax(dim=-1)
            sums[out, col] = torch.exp(chunk.sub_(maxes[out, col].unsqueeze(-1)), out=e).sum(dim=-1)

    _each_chunk(chunks, body, 2, step, shard, dtype, student.device, _rows_apart(student, teacher))
    (shift, log_total), _ = combine_logsumexp(shard, maxes, sums)
    return shift, log_total


def _one_pass_jsd(chunks, num: int, student, teacher, shard, tau, step, dtype, beta: float):
    """Without TP, JSD(beta)'s normalizers `(shift, log_total)` `[n, 2]` each (student, teacher)
    and its terms `[n, 2]` (as `_divergence_terms`) in one pass: each chunk's logits are read
    (an LM head's: computed) once, not once for the statistics and again for the terms, and the
    exponentials of the statistics are the probabilities."""
    shift = torch.empty(num, 2, dtype=dtype, device=student.device)
    log_total = torch.empty_like(shift)
    terms = torch.empty_like(shift)

    def body(out, src, buffers):
        log_s, log_t, p_s, p_t, log_m = buffers
        for col, source, log_p, p in ((0, student, log_s, p_s), (1, teacher, log_t, p_t)):
            chunk = _read_tempered(source, src, shard, tau, log_p)
            shift[out, col] = chunk.amax(dim=-1)
            chunk.sub_(shift[out, col].unsqueeze(-1))
            total = torch.exp(chunk, out=p).sum(dim=-1)
            log_total[out, col] = total.log()
            chunk.sub_(log_total[out, col].unsqueeze(-1))  # log P = (x - shift) - log_total
            p.div_(total.unsqueeze(-1))
        _log_mixture_into(p_s, p_t, beta, log_m)
        terms[out, 0] = _row_dot(p_t, log_t.sub_(log_m))
        terms[out, 1] = _row_dot(p_s, log_s.sub_(log_m))

    _each_chunk(chunks, body, 5, step, shard, dtype, student.device, _rows_apart(student, teacher))
    return shift, log_total, terms


def _log_mixture_into(p_s: torch.Tensor, p_t: torch.Tensor, beta: float, out: torch.Tensor) -> torch.Tensor:
    """log M = log(beta P_T + (1 - beta) P_S) into `out`; where both underflow, NEG_INF (both
    terms are then 0 * finite)."""
    return torch.mul(p_t, beta, out=out).add_(p_s, alpha=1.0 - beta).log_().clamp_(min=NEG_INF)


def _log_probs(source, src, shard, tau, shift, log_total, out: torch.Tensor) -> torch.Tensor:
    """log P `[rows, v]` into `out`: (x - shift) - log_total, never x - (shift + log_total)."""
    _read_tempered(source, src, shard, tau, out)
    return out.sub_(shift.unsqueeze(-1)).sub_(log_total.unsqueeze(-1))


def _jsd_chunk(student, teacher, src, shard, tau, shift, log_total, beta, log_s, log_t, p_s, p_t, log_m) -> None:
    """Fills log P_S, log P_T, P_S, P_T and log M `[rows, v]` for one chunk (statistics `[rows, 2]`)."""
    for col, source, log_p, p in ((0, student, log_s, p_s), (1, teacher, log_t, p_t)):
        torch.exp(_log_probs(source, src, shard, tau, shift[:, col], log_total[:, col], log_p), out=p)
    _log_mixture_into(p_s, p_t, beta, log_m)


def _divergence_terms(chunks, num, student, teacher, shard, tau, step, dtype, shift, log_total, beta
                      ) -> torch.Tensor:
    """This shard's `[n, 2]`: sum P_T (log P_T - log M), sum P_S (log P_S - log M) (for beta 0 / 1
    only the term that is the KL; the other column is 0)."""
    terms = torch.zeros(num, 2, dtype=dtype, device=student.device)

    def body(out, src, buffers):
        if beta in (0.0, 1.0):
            log_s, log_t, p = buffers
            _log_probs(student, src, shard, tau, shift[out, 0], log_total[out, 0], log_s)
            _log_probs(teacher, src, shard, tau, shift[out, 1], log_total[out, 1], log_t)
            if beta == 0.0:
                terms[out, 0] = _row_dot(torch.exp(log_t, out=p), log_t.sub_(log_s))
            else:
                terms[out, 1] = _row_dot(torch.exp(log_s, out=p), log_s.sub_(log_t))
            return
        log_s, log_t, p_s, p_t, log_m = buffers
        _jsd_chunk(student, teacher, src, shard, tau, shift[out], log_total[out], beta, log_s, log_t, p_s, p_t, log_m)
        terms[out, 0] = _row_dot(p_t, log_t.sub_(log_m))
        terms[out, 1] = _row_dot(p_s, log_s.sub_(log_m))

    _each_chunk(chunks, body, 3 if beta in (0.0, 1.0) else 5, step, shard, dtype, student.device,
                _rows_apart(student, teacher))
    return terms


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
    # The vocab padding left out (its gradient is 0).
    teacher, make_student = without_padding(teacher, shard), _without_padding(make_student, shard)
    per_row = _FullVocabDivergence.apply(rows, shard, float(beta), float(temperature), chunk_size, teacher,
                                         make_student, *student_tensors)
    return _reduce(per_row, rows, token_shape, reduction)


def _without_padding(make_source, shard: VocabShard):
    """`make_source` whose sources leave out the vocab padding (`vocab_parallel.without_padding`)."""
    def make(*tensors):
        return without_padding(make_source(*tensors), shard)
    return make


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
