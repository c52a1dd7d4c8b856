"""`megatron_opd.ops.sampling`: the sampled ids follow softmax(logits / T) (restricted to the top k),
reproducibly from per-row seeds and steps, and identically at every TP size.

The distribution checks are Pearson chi-square tests at p = 0.001 of many seeded draws
from a small fixed distribution against softmax(logits / T) computed here in float64;
`test_chi_square_detects_a_wrong_temperature` shows they reject samples drawn at another
temperature. The draws come from 20000 rows with distinct seeds, from one seed over 20000
steps, and from a generator; pairs of draws (consecutive steps, neighbouring seeds) are
tested for independence against the product distribution. TP=2 and TP=4 run in
`run_distributed` (one launch each, shared through a cache) and must give exactly the
TP=1 ids. `hash32` is checked against lowbias32 written in plain Python integers.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_opd.ops import vocab_parallel_sample
from megatron_opd.ops.sampling import hash32
from megatron_opd.testing import run_distributed
from tests.ops_helpers import CHI2_CRITICAL_P001, chi_square, randn, shard, tp_rank

SAMPLE_ROWS, SAMPLE_VOCAB, SAMPLE_TEMPERATURE = 20000, 16, 0.7
TOP3_IDS = (2, 6, 13)


def sample_logits(rows: int = SAMPLE_ROWS) -> torch.Tensor:
    """`[rows, 16]`, every row the same: three clear leaders (the top 3) and 13 smaller logits."""
    row = randn((SAMPLE_VOCAB,), 121, 0.8)
    row[list(TOP3_IDS)] = torch.tensor([2.5, 2.2, 2.0])
    return row.expand(rows, SAMPLE_VOCAB).contiguous()


def expected_probs(logits_row: torch.Tensor, temperature: float, top_k) -> torch.Tensor:
    """float64 softmax(logits / T) `[V]`, renormalized over the top k when given."""
    probs = torch.softmax(logits_row.double() / temperature, -1)
    if top_k is not None:
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[probs.topk(top_k).indices] = True
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


def check_samples(samples: torch.Tensor, logits_row: torch.Tensor, top_k, temperature=SAMPLE_TEMPERATURE) -> None:
    assert samples.dtype == torch.int64
    assert samples.min() >= 0 and samples.max() < logits_row.numel()
    if top_k is not None:
        assert set(samples.unique().tolist()) <= set(TOP3_IDS), f"top_k=3 sampled {samples.unique().tolist()}"
    statistic, dof = chi_square(samples, expected_probs(logits_row, temperature, top_k))
    assert statistic < CHI2_CRITICAL_P001[dof], f"chi-square {statistic:.2f} >= {CHI2_CRITICAL_P001[dof]} (dof {dof})"


# Ways of keying the rows' noise: kwargs of vocab_parallel_sample for SAMPLE_ROWS rows.
KEYINGS = {
    "row_seeds": lambda: {"seeds": torch.arange(SAMPLE_ROWS) * 7919 - 10**6, "step": 3},
    "one_seed_many_steps": lambda: {"seeds": [2**63 + 5] * SAMPLE_ROWS, "step": torch.arange(SAMPLE_ROWS)},
    "generator": lambda: {"generator": torch.Generator().manual_seed(5)},
}


# ------------------------------------------------------------------ the hash


def lowbias32(word: int) -> int:
    """The reference: lowbias32 on Python integers (unbounded, masked to 32 bits)."""
    word &= 0xFFFFFFFF
    word ^= word >> 16
    word = (word * 0x7FEB352D) & 0xFFFFFFFF
    word ^= word >> 15
    word = (word * 0x846CA68B) & 0xFFFFFFFF
    return word ^ (word >> 16)


def test_hash32_is_lowbias32():
    """Also the premise of the tensor version: int32 products wrap modulo 2^32."""
    words = [0, 1, 2, 3, 255, 65535, 65536, 12345678, 2**31 - 1, 2**31, 2**31 + 1, 0xDEADBEEF, 2**32 - 1]
    words += torch.randint(0, 2**32, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    as_int32 = torch.tensor([w - 2**32 if w >= 2**31 else w for w in words], dtype=torch.int32)
    got = [w & 0xFFFFFFFF for w in hash32(as_int32.clone()).tolist()]
    assert got == [lowbias32(w) for w in words]
    assert hash32(torch.tensor([5, 6], dtype=torch.int32).expand(3, 2).clone()).unique(dim=0).shape[0] == 1


# ------------------------------------------------------------------ TP = 1


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("keying", list(KEYINGS))
def test_distribution_tp1(keying, top_k):
    logits = sample_logits()
    samples = vocab_parallel_sample(logits, temperature=SAMPLE_TEMPERATURE, top_k=top_k, **KEYINGS[keying]())
    assert samples.shape == (SAMPLE_ROWS,)
    check_samples(samples, logits[0], top_k)
    # The same keys give the same ids.
    again = vocab_parallel_sample(logits, temperature=SAMPLE_TEMPERATURE, top_k=top_k, **KEYINGS[keying]())
    assert torch.equal(samples, again)


def test_chi_square_detects_a_wrong_temperature():
    """The check bites: samples at temperature 1 fail against softmax(logits / 0.7)."""
    logits = sample_logits()
    samples = vocab_parallel_sample(logits, temperature=1.0, **KEYINGS["row_seeds"]())
    check_samples(samples, logits[0], None, temperature=1.0)
    with pytest.raises(AssertionError, match="chi-square"):
        check_samples(samples, logits[0], None)


def test_pairs_of_draws_are_independent():
    """Joint counts of (draw at step t, draw at step t + 1) of one seed, and of (seed s, seed s + 1)
    at one step, against the product of the marginals: 16 cells, 15 dof."""
    logits_row = torch.tensor([0.3, -0.2, 0.9, 0.0])
    probs = expected_probs(logits_row, 1.0, None)
    pair_probs = (probs[:, None] * probs[None, :]).flatten()
    draws = 40000
    by_step = vocab_parallel_sample(logits_row.expand(draws + 1, 4), seeds=[11] * (draws + 1),
                                    step=torch.arange(draws + 1))
    by_seed = vocab_parallel_sample(logits_row.expand(draws + 1, 4), seeds=torch.arange(draws + 1), step=0)
    for name, samples in (("consecutive steps", by_step), ("neighbouring seeds", by_seed)):
        statistic, dof = chi_square(samples[:-1] * 4 + samples[1:], pair_probs)
        assert statistic < CHI2_CRITICAL_P001[dof], f"{name}: chi-square {statistic:.2f} (dof {dof})"


def test_a_row_depends_only_on_its_seed_and_step():
    logits = randn((6, 50), 31)
    seeds, steps = torch.tensor([3, 1, 4, 1, 5, 9]), torch.tensor([0, 7, 7, 2, 0, 1])
    batch = vocab_parallel_sample(logits, temperature=2.0, seeds=seeds, step=steps)
    for row in range(6):
        alone = vocab_parallel_sample(logits[row:row + 1], temperature=2.0, seeds=seeds[row:row + 1],
                                      step=int(steps[row]))
        assert alone.item() == batch[row].item(), f"row {row} changed with its batch"
    # Token shape [2, 3] with a per-token seed tensor: the same ids.
    shaped = vocab_parallel_sample(logits.view(2, 3, 50), temperature=2.0, seeds=seeds.view(2, 3),
                                   step=steps.view(2, 3))
    assert torch.equal(shaped.flatten(), batch)
    # Another step or seed: other ids (on a flat distribution, for most of 200 rows).
    flat = torch.zeros(200, 1000)
    base = vocab_parallel_sample(flat, seeds=torch.arange(200), step=0)
    assert (vocab_parallel_sample(flat, seeds=torch.arange(200), step=1) != base).float().mean() > 0.9
    assert (vocab_parallel_sample(flat, seeds=torch.arange(200) + 200, step=0) != base).float().mean() > 0.9


def test_greedy_padding_and_errors():
    logits = randn((5, 12), 41)
    logits[:, 10:] = 1e6  # padding: never sampled
    greedy = vocab_parallel_sample(logits, temperature=0.0, vocab_size=10)
    assert torch.equal(greedy, logits[:, :10].argmax(-1))
    hot = vocab_parallel_sample(logits[0].expand(4000, 12).contiguous(), temperature=50.0, vocab_size=10,
                                seeds=torch.arange(4000))
    assert hot.max() < 10 and hot.unique().numel() == 10
    with pytest.raises(ValueError, match="seeds has 4 values for 5 rows"):
        vocab_parallel_sample(logits, seeds=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="seeds or generator"):
        vocab_parallel_sample(logits, seeds=[1] * 5, generator=torch.Generator())
    with pytest.raises(ValueError, match="temperature=-1"):
        vocab_parallel_sample(logits, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k=11"):
        vocab_parallel_sample(logits, top_k=11, vocab_size=10, seeds=[0] * 5)


# ------------------------------------------------------------------ TP = 2 and 4


@functools.cache
def tp_cases() -> dict:
    """name -> (full logits, keying, other kwargs); 24 ids: 12 per shard at TP=2, 6 at TP=4.
    The keyings' seeds and generators are made on each rank (a generator does not travel)."""
    cases = {}
    for top_k in (None, 3):
        for keying in ("row_seeds", "one_seed_many_steps"):
            cases[f"{keying} top_k={top_k}"] = (sample_logits(), keying, {"top_k": top_k})
    padded = torch.cat([sample_logits(), torch.full((SAMPLE_ROWS, 8), 1e6)], dim=-1)  # ids 16..23 padding
    cases["padded"] = (padded, "row_seeds", {"vocab_size": SAMPLE_VOCAB})
    cases["generator"] = (sample_logits(), "generator", {})
    return cases


def tp_rank_body(tp: int, cases: dict) -> dict:
    rank = tp_rank(tp)
    return {name: vocab_parallel_sample(shard(logits, tp, rank), temperature=SAMPLE_TEMPERATURE,
                                        **KEYINGS[keying](), **kwargs)
            for name, (logits, keying, kwargs) in cases.items()}


@functools.cache
def tp_samples(tp: int) -> list[dict]:
    return (run_distributed(tp_rank_body, tp, tp, tp_cases(), timeout=300.0) if tp > 1
            else [tp_rank_body(1, tp_cases())])


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_samples_equal_tp1_and_follow_the_softmax(tp):
    per_rank, tp1 = tp_samples(tp), tp_samples(1)[0]
    for name in tp_cases():
        samples = per_rank[0][name]
        for rank, result in enumerate(per_rank):
            assert torch.equal(result[name], samples), f"TP={tp} {name}: rank {rank} sampled other ids than rank 0"
        assert torch.equal(samples, tp1[name]), f"TP={tp} {name}: other ids than at TP=1"
        check_samples(samples, sample_logits(1)[0], 3 if "top_k=3" in name else None)
