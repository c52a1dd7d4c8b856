"""The k largest logits over a vocab sharded across tensor-parallel ranks, and a teacher's top-k answer.

Rank r holds logits `[N, V/tp]` for the global ids `[r*V/tp, (r+1)*V/tp)`. The global
top-k of a row is among the union of every shard's local top-min(k, V/tp), so each rank
takes its local top-k chunk by chunk and one all-gather each of the `[N, min(k, V/tp) * tp]`
values and ids merges them; nothing of size V crosses ranks.

`sharded_topk` gives the teacher's top-K ids of the divergences and the sampler's top-k
threshold; `fused_linear_topk_logprobs` is what a teacher server returns (vLLM's
`prompt_logprobs`) and the teacher cache stores: the top-k ids and their full-vocab
log-probabilities, in the same pass over an LM head's logits as the normalizer.

Hand-written because `torch.topk` and `log_softmax` need the whole row, which here would
mean gathering `[N, V]` logits on every rank.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_opd.ops.logits_source import LinearLogits
from megatron_opd.ops.vocab_parallel import (
    VocabShard,
    check_ids,
    check_temperature,
    combine_logsumexp,
    compute_dtype,
    flatten_tokens,
    local_max_and_sumexp,
    log_softmax_with,
    owned_positions,
    row_chunks,
    tempered,
    vocab_shard,
)

__all__ = ["fused_linear_topk_logprobs", "sharded_topk"]


def _topk_pass(source, k: int, shard: VocabShard, temperature: float, chunk_rows: Optional[int], *,
               normalize: bool = False, pick: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
    """One pass over the logits source's rows, chunk by chunk: the top k of `logits / tau` over
    the whole vocab, values and global ids `[N, k]` (sorted, descending).

    With `normalize`, also each row's normalizer `(shift, log_total)` `[N]` each (see
    `combine_logsumexp`) from the same chunks, and with `pick` (`owned`, `local` `[N, 1]`
    from `owned_positions`) the tempered logits at those ids `[N, 1]`, summed over ranks in
    the normalizer's all-reduce. Returns `(values, ids, normalizer or None, picked or None)`.
    """
    dtype = compute_dtype(source.dtype)
    local_k = min(k, shard.local_vocab)
    zero = torch.zeros((), dtype=dtype, device=source.device)
    values, ids, maxes, sums, picks = [], [], [], [], []
    for _, rows in row_chunks(None, source.num_rows, shard.local_vocab, chunk_rows):
        x = tempered(source.chunk(rows), shard, temperature)
        chunk_values, chunk_ids = x.topk(local_k, dim=-1)
        values.append(chunk_values)
        ids.append(chunk_ids + shard.start)
        if normalize:  # over the real ids only: exp of the padding's NEG_INF is slow on CPU
            row_max, sumexp = local_max_and_sumexp(x[:, :shard.computed_columns])
            maxes.append(row_max)
            sums.append(sumexp)
        if pick is not None:  # the given ids' logits, read from the same chunk (0 where not owned)
            owned, local = pick
            picks.append(torch.where(owned[rows], x.gather(-1, local[rows]), zero))

    def rows_of(parts: list, *shape: int, like=dtype) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.empty(0, *shape, dtype=like, device=source.device)

    normalizer = picked = None
    if normalize:
        normalizer, picked = combine_logsumexp(shard, rows_of(maxes), rows_of(sums),
                                               extra_sum=None if pick is None else rows_of(picks, 1))
    gathered_values = shard.all_gather_last(rows_of(values, local_k))
    gathered_ids = shard.all_gather_last(rows_of(ids, local_k, like=torch.long))
    top_values, position = gathered_values.topk(k, dim=-1, sorted=True)
    return top_values, gathered_ids.gather(-1, position), normalizer, picked


def sharded_topk(source, k: int, shard: VocabShard, temperature: float,
                 chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of `logits / tau` over the whole vocab, for every row of a logits
    source (see `logits_source`; this rank's `[N, V/tp]`): values (compute dtype) and global
    ids `[N, k]`, sorted by descending value, the same on every rank. No gradient.
    """
    values, ids, _, _ = _topk_pass(source, k, shard, temperature, chunk_size)
    return values, ids


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

    One pass over the logits, chunk by chunk: each chunk's local top-k and softmax
    statistics together; then the two all-reduces of the normalizer (the given tokens'
    logits ride along in the second) and one all-gather each of `[N, k * tp]` values and
    ids. The same result on every TP rank. No gradient.
    """
    check_temperature(temperature)
    hidden = flatten_tokens(hidden)
    shard = vocab_shard(weight.shape[0], vocab_size, tp_group)
    if not 1 <= k <= shard.vocab_size:
        raise ValueError(f"k={k!r} is invalid: must be in [1, vocab_size={shard.vocab_size}]")
    source = LinearLogits(hidden, weight, chunk_size)
    pick = None
    if token_ids is not None:
        if token_ids.shape != (source.num_rows,):
            raise ValueError(f"token_ids has shape {tuple(token_ids.shape)}, expected [{source.num_rows}]")
        check_ids(token_ids, shard, "token_ids")
        pick = owned_positions(token_ids.reshape(-1, 1).long(), shard)
    top_values, top_ids, (shift, log_total), picked = _topk_pass(
        source, k, shard, temperature, chunk_size or source.chunk_rows, normalize=True, pick=pick)
    token_logprobs = None if picked is None else log_softmax_with(picked, shift, log_total).squeeze(-1).float()
    return log_softmax_with(top_values, shift, log_total).float(), top_ids, token_logprobs
