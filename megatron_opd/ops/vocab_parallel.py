"""Shared helpers of the vocab-parallel ops: where a rank's vocab shard lies, and softmax statistics over it.

Rank r of a TP group of size tp holds logits `[N, V/tp]` for the contiguous global ids
`[r*V/tp, (r+1)*V/tp)`; ids >= the true vocab size are padding. Here: `VocabShard` (that
layout and its collectives), the row chunks every op iterates over (so that no fp32
copy of `[N, V/tp]` outlives one chunk), temperature and padding (`tempered`), the global
log-normalizer from per-shard (max, sum-exp) in two all-reduces of `[N]` floats
(`combine_logsumexp`, `logsumexp_rows`), and which rank owns a global id
(`owned_positions`). The ops built on them (`divergence`, `token_logprobs`, `topk`,
`sampling`) exchange O(1) or O(K) floats per token, never a vocab-sized tensor.

Hand-written because no library computes softmax statistics over vocab-sharded logits
with a temperature and vocab padding (Megatron's `vocab_parallel_cross_entropy` does
only the cross-entropy, in place).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist

from megatron_opd.ops.logits_source import DEFAULT_CHUNK_ELEMENTS


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

    @property
    def computed_columns(self) -> int:
        """The columns a full-vocab kernel computes on this shard: its real ids, which come first
        (all of them on a shard of padding only, so that every row has a value). The padding ids
        are left out rather than set to NEG_INF: exp and log of values that underflow take a
        scalar slow path on CPU, 40x slower per element than the vectorized one (measured:
        exp of [256, 128] with 96 padding columns 236 us, without them 6 us)."""
        return self.valid_local or self.local_vocab

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
    """This rank's shard of `local_vocab` (V/tp) ids; `vocab_size` None: no padding."""
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
    """The selected row indices `[n]` (all `[N]` when `rows` is None)."""
    return torch.arange(num_rows, device=device) if rows is None else rows


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs (softmax statistics never in half precision), fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The stand-in for -inf: exp() of it is exactly 0, and p * (log p - log q) with p = 0 is
# 0 without the guards (torch.where, several times the cost of an exp) that -inf needs.
# A token one model rules out and the other gives mass then has a huge, finite cost.
NEG_INF = -1e30


def tempered(logits: torch.Tensor, shard: VocabShard, temperature: float) -> torch.Tensor:
    """`logits / temperature` `[rows, V/tp]` in the compute dtype, -inf and padding ids at
    NEG_INF (a new chunk-sized tensor)."""
    x = (logits.to(compute_dtype(logits.dtype)) / temperature).clamp_(min=NEG_INF)
    if shard.valid_local < shard.local_vocab:
        x[..., shard.valid_local:] = NEG_INF
    return x


def without_padding(source, shard: VocabShard):
    """A logits source (`logits_source`) on this shard's `computed_columns` only: the vocab padding
    neither computed nor read, its gradient columns zero (see `VocabShard.computed_columns`)."""
    columns = shard.computed_columns
    return source.narrowed(columns) if columns < source.local_vocab else source


def local_max_and_sumexp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[rows, V/tp]` -> per row `[rows]` each: max over this shard and sum(exp(x - max))
    (x is finite, see `tempered`)."""
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
    """ValueError naming `name` unless every global id is a real token (0 <= id < vocab_size)."""
    if ids.numel() and (ids.min() < 0 or ids.max() >= shard.vocab_size):
        raise ValueError(f"{name} contains ids outside [0, {shard.vocab_size}): "
                         f"min {ids.min().item()}, max {ids.max().item()}")


def flatten_tokens(tensor: torch.Tensor) -> torch.Tensor:
    """`[..., V]` -> `[N, V]` without copying when possible."""
    return tensor.reshape(-1, tensor.shape[-1])
