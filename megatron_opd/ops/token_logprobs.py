"""Log-probabilities at given ids, from vocab-sharded logits: `log softmax(logits / tau)[ids]`.

Rank r holds logits `[N, V/tp]` for the global ids `[r*V/tp, (r+1)*V/tp)`. Each rank reads
the logits of the ids it owns (0 elsewhere) and adds them to the sum-exp all-reduce of
the normalizer, so `[N, K]` log-probs cost two all-reduces of `[N, 1 + K]` floats, and
the backward none. `ShardedLogProbsAt` is the one autograd function for this; it serves
the token log-probs of SFT and OPD-RL (K = 1, the gradient of log p(y) that OPD-RL needs),
and the divergences (a student's log-probs at a teacher's K ids).

Hand-written because no library computes this on vocab-sharded logits with a temperature:
Megatron's `vocab_parallel_cross_entropy` computes -log p(y), but overwrites its input in
place and knows neither temperature nor vocab padding.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from megatron_opd.ops.logits_source import DenseLogits, LinearLogits
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
    logsumexp_rows,
    owned_positions,
    row_chunks,
    source_rows,
    tempered,
    vocab_shard,
    without_padding,
)

__all__ = ["ShardedLogProbsAt", "fused_linear_token_logprobs", "vocab_parallel_token_logprobs"]


def _id_mask(shape: torch.Size, owned: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Bool `[n, V/tp]`, True at this shard's ids (`owned`, `local` `[n, K]`)."""
    is_id = torch.zeros(shape, dtype=torch.bool, device=local.device)
    row_index = torch.arange(shape[0], device=local.device).unsqueeze(-1).expand_as(local)
    is_id[row_index[owned], local[owned]] = True
    return is_id


class ShardedLogProbsAt(torch.autograd.Function):
    """log softmax(logits / tau) at global ids, for selected rows of a logits source
    (`make_source(*tensors)`, see `logits_source`): ids `[n, K]` (distinct per row),
    rows `[n]` (None: all N) -> `[n, K]`, or `[n, K + 1]` with `with_tail`: the last
    column is log of the mass outside the ids, summed directly over the other entries
    (1 - sum_K p loses all precision in fp32 when the K ids hold nearly all the mass).

    With `normalized=False` it returns `logits / tau` at the ids (no logsumexp: enough
    when the caller renormalizes over the K ids). Forward: two all-reduces of
    `[n, 1 + K]` floats, plus two of `[n]` for the tail. Backward: none (the upstream
    gradient is the same on every rank, so each rank computes its own shard's
    gradient locally): d/dx_v = (1[v in ids] g_v + 1[v not in ids] p_v g_tail / tail
    - p_v (sum_k g_k + g_tail)) / tau; unselected rows get 0. The vocab padding is left out of
    both passes (`without_padding`): its probability and gradient are 0.
    """

    @staticmethod
    def forward(ctx, ids, rows, shard: VocabShard, temperature: float, normalized: bool,
                with_tail: bool, chunk_size: Optional[int], make_source, *tensors):
        if with_tail and not normalized:
            raise ValueError("with_tail needs normalized log-probabilities")
        source = without_padding(make_source(*tensors), shard)
        owned, local = owned_positions(ids, shard)
        src = source_rows(rows, source.num_rows, source.device).unsqueeze(-1)
        dtype = compute_dtype(source.dtype)
        picked = torch.where(owned, (source.at(src, local).to(dtype) / temperature).clamp(min=NEG_INF),
                             torch.zeros((), dtype=dtype, device=source.device))
        shift = log_total = tail = None
        if not normalized:
            result = shard.all_reduce(picked)
        else:
            (shift, log_total), picked = logsumexp_rows(source, rows, shard, temperature, chunk_size,
                                                        extra_sum=picked)
            result = log_softmax_with(picked, shift, log_total)
            if with_tail:
                # log of the mass outside the ids, as a sharded logsumexp in log space: the
                # tail can be far below fp32's smallest number (logits spread 1e4) while
                # its log is an ordinary value. An empty tail (K = vocab) is NEG_INF.
                maxes, sums = [], []
                for out, src_rows in row_chunks(rows, source.num_rows, shard.local_vocab, chunk_size):
                    logp = log_softmax_with(tempered(source.chunk(src_rows), shard, temperature),
                                            shift[out], log_total[out])
                    outside = logp.masked_fill(_id_mask(logp.shape, owned[out], local[out]), NEG_INF)
                    row_max, sumexp = local_max_and_sumexp(outside)
                    maxes.append(row_max)
                    sums.append(sumexp)
                empty = shift.new_empty(0)
                (tail_shift, tail_log_total), _ = combine_logsumexp(
                    shard, torch.cat(maxes) if maxes else empty, torch.cat(sums) if sums else empty)
                tail = (tail_shift + tail_log_total).clamp(min=NEG_INF)  # log tail mass
                result = torch.cat([result, tail.unsqueeze(-1)], dim=-1)
        ctx.save_for_backward(ids, rows, shift, log_total, tail, *tensors)
        ctx.shard, ctx.temperature, ctx.chunk_size, ctx.make_source = shard, temperature, chunk_size, make_source
        return result

    @staticmethod
    def backward(ctx, grad_out):
        ids, rows, shift, log_total, tail, *tensors = ctx.saved_tensors
        shard, tau = ctx.shard, ctx.temperature
        source = without_padding(ctx.make_source(*tensors), shard)
        owned, local = owned_positions(ids, shard)
        grad_out = grad_out.to(compute_dtype(source.dtype)) / tau
        grad_ids = torch.where(owned, grad_out[:, :ids.shape[-1]], torch.zeros_like(local, dtype=grad_out.dtype))
        total = grad_out.sum(-1)
        source.start_backward(grad_out.dtype)
        for out, src_rows in row_chunks(rows, source.num_rows, shard.local_vocab, ctx.chunk_size):
            if shift is None:
                chunk_grad = torch.zeros(out.stop - out.start, source.local_vocab, dtype=grad_out.dtype,
                                         device=source.device)
            else:
                logp = log_softmax_with(tempered(source.chunk(src_rows), shard, tau), shift[out], log_total[out])
                chunk_grad = -logp.exp() * total[out].unsqueeze(-1)
                if tail is not None:
                    # d log tail / dx_v = p_v / tail for v outside the ids: exp(log p_v - log tail).
                    relative = torch.exp(logp - tail[out].unsqueeze(-1))
                    relative = relative.masked_fill(_id_mask(logp.shape, owned[out], local[out]), 0.0)
                    chunk_grad += relative * grad_out[out, -1].unsqueeze(-1)
            chunk_grad.scatter_add_(-1, local[out], grad_ids[out])
            source.add_chunk_grad(src_rows, chunk_grad)
        return (None,) * 8 + source.grads()


def vocab_parallel_token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, *,
                                  temperature: float = 1.0, vocab_size: Optional[int] = None,
                                  tp_group=None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """log softmax(logits / temperature)[token_ids] over the sharded vocab: logits `[..., V/tp]`
    (this rank's shard), global ids `[...]` -> `[...]` fp32.

    Differentiable with respect to `logits`; the same value on every TP rank.
    """
    return _token_logprobs(DenseLogits, (flatten_tokens(logits),), logits.shape[-1], token_ids,
                           temperature, vocab_size, tp_group, chunk_size)


def fused_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, *,
                                temperature: float = 1.0, vocab_size: Optional[int] = None,
                                tp_group=None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """`vocab_parallel_token_logprobs(hidden @ weight.T, token_ids)` without holding the logits:
    hidden `[..., H]`, LM-head shard `[V/tp, H]`, ids `[...]` -> `[...]` fp32.

    Differentiable with respect to `hidden` and `weight` (logits recomputed per chunk).
    The gradient of `hidden` is this shard's part: pass `hidden` through Megatron's
    `copy_to_tensor_model_parallel_region` to sum it over TP, as its output layer does.
    """
    source = functools.partial(LinearLogits, chunk_rows=chunk_size)
    return _token_logprobs(source, (flatten_tokens(hidden), weight), weight.shape[0], token_ids,
                           temperature, vocab_size, tp_group, chunk_size)


def _token_logprobs(make_source, tensors, local_vocab: int, token_ids: torch.Tensor, temperature: float,
                    vocab_size: Optional[int], tp_group, chunk_size: Optional[int]) -> torch.Tensor:
    check_temperature(temperature)
    shard = vocab_shard(local_vocab, vocab_size, tp_group)
    check_ids(token_ids, shard, "token_ids")
    flat = ShardedLogProbsAt.apply(token_ids.reshape(-1, 1).long(), None, shard, float(temperature),
                                   True, False, chunk_size, make_source, *tensors)
    return flat.view(token_ids.shape)
