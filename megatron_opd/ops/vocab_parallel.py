"""Softmax statistics and lookups over a vocabulary sharded across tensor-parallel ranks.

Rank r of a TP group of size tp holds logits `[N, V/tp]` for the contiguous global
ids `[r*V/tp, (r+1)*V/tp)`. Everything here exchanges O(1) or O(K) floats per token,
never a vocab-sized tensor, and works chunk by chunk over tokens so that no fp32
copy of `[N, V/tp]` outlives one chunk.

Megatron's `vocab_parallel_cross_entropy` computes `-log p(y)` but overwrites its
input in place and knows neither temperature nor vocab padding, hence these.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist

from megatron_opd.ops.logits_source import DEFAULT_CHUNK_ELEMENTS, DenseLogits, LinearLogits



@dataclass(frozen=True)
class VocabShard:
    """Where this rank's slice of the vocab lies, and which of its ids are real tokens."""

    group: Optional[dist.ProcessGroup]
    size: int  # TP world size
    rank: int
    local_vocab: int  # V/tp
    vocab_size: int  # true vocab; ids >= it are padding

    @property
    def start(self) -> int:
        return self.rank * self.local_vocab

    @property
    def padded_vocab(self) -> int:
        return self.size * self.local_vocab

    @property
    def valid_local(self) -> int:
        """How many of this shard's ids are real tokens (the rest is padding)."""
        return max(0, min(self.local_vocab, self.vocab_size - self.start))

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def all_gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """`[..., k]` from every rank -> `[..., k * tp]` (rank-major)."""
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def resolve_tp_group(tp_group: Optional[dist.ProcessGroup]) -> Optional[dist.ProcessGroup]:
    """`tp_group`, else Megatron's tensor-parallel group when initialized, else None (no TP)."""
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def vocab_shard(local_vocab: int, vocab_size: Optional[int], tp_group) -> VocabShard:
    group = resolve_tp_group(tp_group)
    size = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    padded = size * local_vocab
    if vocab_size is None:
        vocab_size = padded
    if not 1 <= vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} is invalid: between 1 and the sharded vocab {padded}")
    return VocabShard(group, size, rank, local_vocab, vocab_size)


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: must be > 0")


def row_chunks(rows: Optional[torch.Tensor], num_rows: int, local_vocab: int,
               chunk_size: Optional[int]) -> Iterator[tuple[slice, Union[slice, torch.Tensor]]]:
    """Chunks of the selected rows: `(out, src)`, where `out` slices the compact per-selected-row
    results and `src` indexes the full `[N, ...]` input (`rows[out]`, or `out` when all rows).

    About DEFAULT_CHUNK_ELEMENTS fp32 elements per chunk unless `chunk_size` (rows) is given.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is invalid: must be >= 1")
    step = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // max(1, local_vocab))
    count = num_rows if rows is None else rows.numel()
    for start in range(0, count, step):
        out = slice(start, min(start + step, count))
        yield out, (out if rows is None else rows[out])


def source_rows(rows: Optional[torch.Tensor], num_rows: int, device) -> torch.Tensor:
    return torch.arange(num_rows, device=device) if rows is None else rows


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs (softmax statistics never in half precision), fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The stand-in for -inf: exp() of it is exactly 0, and p * (log p - log q) with p = 0 is
# 0 without the guards (torch.where, several times the cost of an exp) that -inf needs.
# A token one model rules out and the other gives mass then has a huge, finite cost.
NEG_INF = -1e30


def tempered(logits: torch.Tensor, shard: VocabShard, temperature: float) -> torch.Tensor:
    """`logits / temperature` in the compute dtype, -inf and padding ids at NEG_INF
    (a new chunk-sized tensor)."""
    x = (logits.to(compute_dtype(logits.dtype)) / temperature).clamp_(min=NEG_INF)
    if shard.valid_local < shard.local_vocab:
        x[..., shard.valid_local:] = NEG_INF
    return x


def local_max_and_sumexp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: max over this shard and sum(exp(x - max)) (x is finite, see `tempered`)."""
    row_max = x.amax(dim=-1)
    return row_max, torch.exp(x - row_max.unsqueeze(-1)).sum(dim=-1)


def combine_logsumexp(shard: VocabShard, row_max: torch.Tensor, sumexp: torch.Tensor,
                      extra_sum: Optional[torch.Tensor] = None):
    """Global log-normalizer from per-shard (max, sumexp), `[...]` each, in two all-reduces.

    Returns `(shift, log_total)` with logsumexp = shift + log_total, kept apart: log p
    is `(x - shift) - log_total`, never `x - (shift + log_total)`, which would round the
    logsumexp at the magnitude of the logits (ulp 0.002 at 2e4). `extra_sum` `[..., k]`
    rides along in the SUM all-reduce (saves a collective) and is returned second.
    """
    shift = shard.all_reduce(row_max.clone(), dist.ReduceOp.MAX)
    scaled = sumexp * torch.exp(row_max - shift)
    if extra_sum is None:
        return (shift, torch.log(shard.all_reduce(scaled))), None
    packed = shard.all_reduce(torch.cat([scaled.unsqueeze(-1), extra_sum], dim=-1))
    return (shift, torch.log(packed[..., 0])), packed[..., 1:]


def log_softmax_with(x: torch.Tensor, shift: torch.Tensor, log_total: torch.Tensor) -> torch.Tensor:
    """log p for logits `x` `[..., v]` under the normalizer `(shift, log_total)` `[...]`."""
    return (x - shift.unsqueeze(-1)) - log_total.unsqueeze(-1)


def logsumexp_rows(source, rows: Optional[torch.Tensor], shard: VocabShard,
                   temperature: float, chunk_size: Optional[int],
                   extra_sum: Optional[torch.Tensor] = None):
    """logsumexp over the full vocab of `logits / temperature` for the selected rows of a
    logits source: `[n]` (`extra_sum` `[n, k]` is summed across ranks in the same call)."""
    maxes, sums = [], []
    for _, src in row_chunks(rows, source.num_rows, shard.local_vocab, chunk_size):
        row_max, sumexp = local_max_and_sumexp(tempered(source.chunk(src), shard, temperature))
        maxes.append(row_max)
        sums.append(sumexp)
    empty = torch.empty(0, dtype=compute_dtype(source.dtype), device=source.device)
    return combine_logsumexp(shard, torch.cat(maxes) if maxes else empty,
                             torch.cat(sums) if sums else empty, extra_sum)


def owned_positions(ids: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """For global `ids`: whether this shard holds each one, and its local index (0 where not)."""
    local = ids - shard.start
    owned = (local >= 0) & (local < shard.local_vocab)
    return owned, torch.where(owned, local, torch.zeros_like(local))


def check_ids(ids: torch.Tensor, shard: VocabShard, name: str) -> None:
    if ids.numel() and (ids.min() < 0 or ids.max() >= shard.vocab_size):
        raise ValueError(f"{name} contains ids outside [0, {shard.vocab_size}): "
                         f"min {ids.min().item()}, max {ids.max().item()}")


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
    - p_v (sum_k g_k + g_tail)) / tau; unselected rows get 0.
    """

    @staticmethod
    def forward(ctx, ids, rows, shard: VocabShard, temperature: float, normalized: bool,
                with_tail: bool, chunk_size: Optional[int], make_source, *tensors):
        if with_tail and not normalized:
            raise ValueError("with_tail needs normalized log-probabilities")
        source = make_source(*tensors)
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
        source = ctx.make_source(*tensors)
        shard, tau = ctx.shard, ctx.temperature
        owned, local = owned_positions(ids, shard)
        grad_out = grad_out.to(compute_dtype(source.dtype)) / tau
        grad_ids = torch.where(owned, grad_out[:, :ids.shape[-1]], torch.zeros_like(local, dtype=grad_out.dtype))
        total = grad_out.sum(-1)
        source.start_backward(grad_out.dtype)
        for out, src_rows in row_chunks(rows, source.num_rows, shard.local_vocab, ctx.chunk_size):
            if shift is None:
                chunk_grad = torch.zeros(out.stop - out.start, shard.local_vocab, dtype=grad_out.dtype,
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


def flatten_tokens(tensor: torch.Tensor) -> torch.Tensor:
    """`[..., V]` -> `[N, V]` without copying when possible."""
    return tensor.reshape(-1, tensor.shape[-1])


def vocab_parallel_token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, *,
                                  temperature: float = 1.0, vocab_size: Optional[int] = None,
                                  tp_group=None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """log softmax(logits / temperature)[token_ids] over the sharded vocab: `[..., V/tp]`, `[...]` -> `[...]` fp32.

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


def sharded_topk(source, k: int, shard: VocabShard, temperature: float,
                 chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of `logits / tau` over the whole vocab, for every row of a logits
    source: values and global ids `[N, k]`.

    Local top-min(k, V/tp) per shard (chunk by chunk), one all-gather each of the
    `[N, min(k, V/tp) * tp]` values and ids, then top-k of those.
    """
    local_k = min(k, shard.local_vocab)
    values, ids = [], []
    for _, rows in row_chunks(None, source.num_rows, shard.local_vocab, chunk_size):
        chunk_values, chunk_ids = tempered(source.chunk(rows), shard, temperature).topk(local_k, dim=-1)
        values.append(chunk_values)
        ids.append(chunk_ids + shard.start)
    if not values:
        values = [torch.empty(0, local_k, dtype=compute_dtype(source.dtype), device=source.device)]
        ids = [torch.empty(0, local_k, dtype=torch.long, device=source.device)]
    gathered_values = shard.all_gather_last(torch.cat(values))
    gathered_ids = shard.all_gather_last(torch.cat(ids))
    top_values, position = gathered_values.topk(k, dim=-1, sorted=True)
    return top_values, gathered_ids.gather(-1, position)


@torch.no_grad()
def fused_linear_topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, k: int, *,
                               token_ids: Optional[torch.Tensor] = None, temperature: float = 1.0,
                               vocab_size: Optional[int] = None, tp_group=None,
                               chunk_size: Optional[int] = None
                               ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """A teacher's answer for hidden states `[N, H]` and an LM-head shard `[V/tp, H]`: the k
    most likely ids of softmax(hidden @ weight.T / tau) over the true vocab, `[N, k]` global
    ids sorted by descending probability, their full-vocab log-probabilities `[N, k]` fp32,
    and, given `token_ids` `[N]`, the log-probabilities of those ids `[N]` (else None).

    What a teacher server returns (vLLM's `prompt_logprobs`) and the teacher cache stores.
    One pass over the logits, chunk by chunk: each chunk's local top-k and softmax
    statistics together; then one all-gather of `[N, k * tp]` values and ids and the two
    all-reduces of the normalizer (the picked tokens' logits ride along in the second).
    No gradient.
    """
    check_temperature(temperature)
    hidden = flatten_tokens(hidden)
    shard = vocab_shard(weight.shape[0], vocab_size, tp_group)
    if not 1 <= k <= shard.vocab_size:
        raise ValueError(f"k={k!r} is invalid: must be in [1, vocab_size={shard.vocab_size}]")
    source = LinearLogits(hidden, weight, chunk_size)
    dtype = compute_dtype(source.dtype)
    local_k = min(k, shard.local_vocab)
    owned = local = None
    if token_ids is not None:
        if token_ids.shape != (source.num_rows,):
            raise ValueError(f"token_ids has shape {tuple(token_ids.shape)}, expected [{source.num_rows}]")
        check_ids(token_ids, shard, "token_ids")
        owned, local = owned_positions(token_ids.reshape(-1, 1).long(), shard)
    values, ids, maxes, sums, picks = [], [], [], [], []
    for _, rows in row_chunks(None, source.num_rows, shard.local_vocab, chunk_size or source.chunk_rows):
        x = tempered(source.chunk(rows), shard, temperature)
        chunk_values, chunk_ids = x.topk(local_k, dim=-1)
        values.append(chunk_values)
        ids.append(chunk_ids + shard.start)
        row_max, sumexp = local_max_and_sumexp(x)
        maxes.append(row_max)
        sums.append(sumexp)
        if local is not None:  # the given tokens' logits, read from the same chunk (0 where not owned)
            picks.append(torch.where(owned[rows], x.gather(-1, local[rows]), torch.zeros((), dtype=dtype,
                                                                                        device=x.device)))
    picked = None
    if local is not None:
        picked = torch.cat(picks) if picks else torch.empty(0, 1, dtype=dtype, device=source.device)
    empty = torch.empty(0, dtype=dtype, device=source.device)
    (shift, log_total), picked = combine_logsumexp(shard, torch.cat(maxes) if maxes else empty,
                                                   torch.cat(sums) if sums else empty, extra_sum=picked)
    if not values:
        values = [torch.empty(0, local_k, dtype=dtype, device=source.device)]
        ids = [torch.empty(0, local_k, dtype=torch.long, device=source.device)]
    gathered_values = shard.all_gather_last(torch.cat(values))
    gathered_ids = shard.all_gather_last(torch.cat(ids))
    top_values, position = gathered_values.topk(k, dim=-1, sorted=True)
    token_logprobs = None if picked is None else log_softmax_with(picked, shift, log_total).squeeze(-1)
    return (log_softmax_with(top_values, shift, log_total).float(), gathered_ids.gather(-1, position),
            None if token_logprobs is None else token_logprobs.float())
