"""Helpers shared by the tests of `megatron_opd.ops` (tests/test_ops_*.py): inputs, comparisons, TP shards.

Nothing here computes an expected value; references live in `tests/divergence_reference.py`
(float64 dense math) and in the tests themselves.
"""

from __future__ import annotations

import torch

# Exactly-zero references (masked tokens, padding gradients).
ZERO_ATOL = 1e-9

# Chi-square critical values at p = 0.001 by degrees of freedom.
CHI2_CRITICAL_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 8: 26.124, 15: 37.697}


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str, atol: float = ZERO_ATOL,
                 scale: float | None = None) -> None:
    """max |got - want| <= rtol * scale + atol over the whole tensor, scale = max |want| unless given."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values {got[~torch.isfinite(got)][:5].tolist()}"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    if scale is None:
        scale = want.abs().max().item() if want.numel() else 0.0
    bound = rtol * scale + max(atol, ZERO_ATOL)
    assert err <= bound, (f"{what}: max |got - want| = {err:.3g} > {bound:.3g} (max |want| = {scale:.3g}); "
                          f"got {got.flatten()[:4].tolist()}, want {want.flatten()[:4].tolist()}")


def randn(shape, seed: int, scale: float = 2.0) -> torch.Tensor:
    """float32 normal(0, scale) values, reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).float()


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of the sample counts over the support of `probs` `[V]`, and its dof.
    Fails if any sample falls outside the support."""
    support = probs > 0
    counts = torch.bincount(samples.flatten(), minlength=probs.numel()).double()
    assert counts.numel() == probs.numel(), f"samples outside [0, {probs.numel()}): max {samples.max().item()}"
    assert counts[~support].sum() == 0, f"samples outside the support: {counts[~support]}"
    expected = probs[support].double() * samples.numel()
    assert expected.min() >= 5, "chi-square needs >= 5 expected counts per cell"
    statistic = ((counts[support] - expected) ** 2 / expected).sum().item()
    return statistic, int(support.sum()) - 1


def shard(tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's contiguous slice of the last (vocab) dim."""
    return tensor.chunk(tp, dim=-1)[rank].contiguous()


def tp_rank(tp: int) -> int:
    """This process's TP rank: Megatron initialized at TP=`tp` (inside `run_distributed`), or
    0 in-process for tp == 1 (no Megatron state: no TP)."""
    if tp == 1:
        return 0
    from megatron.core import parallel_state

    from megatron_opd.config import ParallelConfig
    from megatron_opd.runtime import initialize_runtime

    initialize_runtime(ParallelConfig(tensor_model_parallel_size=tp))
    assert parallel_state.get_tensor_model_parallel_world_size() == tp
    return parallel_state.get_tensor_model_parallel_rank()
