"""Sampling token ids from vocab-sharded logits: Gumbel-max with counter-based noise.

`vocab_parallel_sample` draws from softmax(logits / temperature), optionally restricted to
the top k, while each rank holds only its `[N, V/tp]` shard of the logits: the argmax over
the vocab of `logits / tau + G`, G ~ Gumbel(0, 1) i.i.d., is an exact sample, and a
sharded argmax costs two all-reduces of `[N]` values.

The noise is a function, not a stream (`gumbel_noise`): G at (row seed, step, global id)
is a 32-bit integer hash of those numbers turned into a uniform and then a Gumbel
variate, computed for the whole `[N, V/tp]` shard in a few elementwise tensor ops. It
depends on the global id, never on the TP size or rank, and on the row's own seed and
step, never on the other rows of the batch, so every rank, every TP size and every batch
composition samples the same ids. (A torch.Generator per row would need a Python loop
over the rows at every decode step.)

Hand-written because no library samples from vocab-sharded logits: vLLM's and
Megatron's samplers gather the full-vocab logits first.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_opd.ops.logits_source import DenseLogits
from megatron_opd.ops.topk import sharded_topk
from megatron_opd.ops.vocab_parallel import VocabShard, flatten_tokens, tempered, vocab_shard

__all__ = ["gumbel_noise", "hash32", "vocab_parallel_sample"]

Seeds = Union[torch.Tensor, Sequence[int]]


def _int32(value: int) -> int:
    """A 32-bit word as the int32 with the same bits."""
    return value - (1 << 32) if value >= 1 << 31 else value


# lowbias32 (C. Wellons, "hash-prospector"): xorshift-multiply rounds whose output bits
# each flip with probability ~1/2 when any input bit flips. A bijection of 32-bit words.
_HASH_SHIFTS = (16, 15, 16)
_HASH_MULTIPLIERS = (_int32(0x7FEB352D), _int32(0x846CA68B))
_GOLDEN = _int32(0x9E3779B9)  # 2^32 / golden ratio: separates the step-0 key from hash32(0) = 0
_ONE_BITS = 0x3F800000  # float32 1.0
_MANTISSA = (1 << 23) - 1


def hash32(words: torch.Tensor) -> torch.Tensor:
    """lowbias32 of every element of an int32 tensor (its 32 bits as an unsigned word), IN PLACE;
    returns `words`.

    PyTorch's int32 multiplication wraps modulo 2^32 on CPU and CUDA alike; its right shift
    is arithmetic, so each shift is masked to the logical one.
    """
    scratch = torch.empty_like(words)
    for index, shift in enumerate(_HASH_SHIFTS):
        torch.bitwise_right_shift(words, shift, out=scratch)
        words ^= scratch.bitwise_and_((1 << (32 - shift)) - 1)
        if index < len(_HASH_MULTIPLIERS):
            words *= _HASH_MULTIPLIERS[index]
    return words


def _low_word(values: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of int64 values as int32 (exactly: sign-extended before the cast)."""
    return (((values & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000).to(torch.int32)


def _row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """A 32-bit key per row from its 64-bit seed and its step (mod 2^32): `[N]` int64 each -> `[N]` int32."""
    key = hash32(_low_word(steps) + _GOLDEN)
    key = hash32(key ^ (seeds >> 32).to(torch.int32))
    return hash32(key ^ _low_word(seeds))


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Gumbel(0, 1) noise `[N, V/tp]` float32 for this shard's global ids, from per-row seeds and
    steps (`[N]` int64 each): a function of (seed, step, global id) only.

    Per element: hash32(hash32(global id) ^ row key), its top 23 bits as the mantissa of a
    float in [1, 2), minus (1 - 2^-24): a uniform u on the 2^23 odd multiples of 2^-24 in
    (0, 1), exactly (never 0 or 1); then G = -log(-log(u)), within [-2.82, 16.64].
    """
    ids = torch.arange(shard.start, shard.start + shard.local_vocab, dtype=torch.int32, device=seeds.device)
    bits = hash32(hash32(ids).unsqueeze(0) ^ _row_keys(seeds, steps).unsqueeze(1))  # [N, V/tp]
    bits >>= 9
    bits &= _MANTISSA
    bits |= _ONE_BITS
    uniform = bits.view(torch.float32).sub_(1.0 - 2.0 ** -24)  # exact (Sterbenz)
    return uniform.log_().neg_().log_().neg_()


def _as_int64(seed: int) -> int:
    """A Python int seed modulo 2^64 as a signed 64-bit value (as torch.Generator.manual_seed reads it)."""
    seed = int(seed) & ((1 << 64) - 1)
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _row_seeds(seeds: Optional[Seeds], generator: Optional[torch.Generator], num_rows: int,
               device: torch.device) -> torch.Tensor:
    """`[N]` int64 seeds: the given ones, else one per row drawn from `generator` (or torch's default)."""
    if seeds is None:
        drawn = torch.empty(num_rows, dtype=torch.long, device=generator.device if generator else device)
        return drawn.random_(generator=generator).to(device)
    if not torch.is_tensor(seeds):
        seeds = torch.tensor([_as_int64(seed) for seed in seeds], dtype=torch.long)
    seeds = seeds.reshape(-1).to(device=device, dtype=torch.long)
    if seeds.numel() != num_rows:
        raise ValueError(f"seeds has {seeds.numel()} values for {num_rows} rows")
    return seeds


@torch.no_grad()
def vocab_parallel_sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    vocab_size: Optional[int] = None,
    seeds: Optional[Seeds] = None,
    step: Union[int, torch.Tensor] = 0,
    generator: Optional[torch.Generator] = None,
    tp_group=None,
) -> torch.Tensor:
    """Sample global ids from softmax(logits / temperature) over the sharded vocab: this rank's
    logits `[..., V/tp]` -> ids `[...]` int64, the same on every TP rank.

    Gumbel-max: argmax over the true vocab (ids below `vocab_size`; the TP padding is never
    sampled) of `logits / tau + G`, with G from `gumbel_noise`. `seeds` `[...]` (a tensor
    or a sequence of ints, taken modulo 2^64) and `step` (an int, or `[...]`) key each row's
    noise: a row's id depends only on its logits, its seed and its step, whatever the TP
    layout or the other rows; use a new step for every draw of a row's stream (e.g. its
    decode position). Without `seeds`, each row's seed is drawn from `generator` (torch's
    default generator if None), which must then be in the same state on every TP rank.
    `temperature=0` is greedy (no noise). `top_k` keeps the k largest logits (ties at the
    k-th value are all kept). Two all-reduces of `[N]` values (plus the top-k's all-gathers).
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r} is invalid: must be >= 0 (0 is greedy)")
    if generator is not None and seeds is not None:
        raise ValueError("give seeds or generator, not both")
    shard = vocab_shard(logits.shape[-1], vocab_size, tp_group)
    token_shape = logits.shape[:-1]
    flat = flatten_tokens(logits)
    scores = tempered(flat, shard, temperature or 1.0)  # [N, V/tp]
    if top_k is not None:
        if not 1 <= top_k <= shard.vocab_size:
            raise ValueError(f"top_k={top_k!r} is invalid: must be in [1, vocab_size={shard.vocab_size}]")
        kth_value = sharded_topk(DenseLogits(flat), top_k, shard, temperature or 1.0)[0][:, -1:]
        scores = scores.masked_fill(scores < kth_value, float("-inf"))
    if temperature > 0:
        row_seeds = _row_seeds(seeds, generator, flat.shape[0], flat.device)
        steps = torch.as_tensor(step, dtype=torch.long, device=flat.device).expand(token_shape).reshape(-1)
        scores += gumbel_noise(row_seeds, steps, shard)
    local_best, local_index = scores.max(dim=-1)
    best = shard.all_reduce(local_best.clone(), dist.ReduceOp.MAX)
    candidate = torch.where(local_best == best, local_index + shard.start,
                            torch.full_like(local_index, shard.padded_vocab))
    return shard.all_reduce(candidate, dist.ReduceOp.MIN).view(token_shape)
