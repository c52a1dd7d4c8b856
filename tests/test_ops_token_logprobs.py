"""`megatron_opd.ops.token_logprobs`: log softmax(logits / tau)[ids] and its gradient against float64 references.

References: `tests/divergence_reference.token_logprobs` (float64 log_softmax of the full,
unsharded logits, then gather) with its gradient from autograd, and for the fused path a
float64 matmul + `torch.log_softmax`. Nothing of the implementation gives expected values.

The gradient is checked unconditionally: OPD-RL's policy gradient and SFT's loss are the
gradient of these log-probs, so an output that stopped being differentiable must fail here
rather than skip its check. TP=2 and TP=4 run in `run_distributed`; each rank returns its
shard's gradient and the parent re-assembles them.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_opd.ops import fused_linear_token_logprobs, vocab_parallel_token_logprobs
from megatron_opd.testing import run_distributed
from tests import divergence_reference as ref
from tests.ops_helpers import assert_close, randn, shard, tp_rank

VALUE_RTOL = 1e-5  # float32 math against float64 on the same values
GRAD_RTOL = 1e-5
GRAD_ATOL = 1e-6
TP_VOCAB = 24  # 12 ids per shard at TP=2, 6 at TP=4


def logprobs_and_grad(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, **kwargs):
    """The op on a leaf copy of `logits`: value and d(sum(weights * value))/d logits."""
    leaf = logits.detach().clone().requires_grad_(True)
    value = vocab_parallel_token_logprobs(leaf, ids, **kwargs)
    assert value.requires_grad, "token log-probs are not differentiable (OPD-RL and SFT need their gradient)"
    (value * weights).sum().backward()
    assert leaf.grad is not None, "no gradient reached the logits"
    return value.detach(), leaf.grad


def reference_and_grad(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, temperature: float,
                       vocab_size: int | None = None):
    leaf = logits.double().requires_grad_(True)
    value = ref.log_probs(leaf, temperature, vocab_size).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (value * weights.double()).sum().backward()
    return value.detach(), leaf.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_tp1_value_and_gradient(temperature):
    logits = randn((3, 5, 40), 111)
    ids = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(112))
    weights = randn((3, 5), 113, 1.0)
    got, grad = logprobs_and_grad(logits, ids, weights, temperature=temperature)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    want, want_grad = reference_and_grad(logits, ids, weights, temperature)
    assert_close(got, want, VALUE_RTOL, f"token logprobs T={temperature}")
    assert_close(grad, want_grad, GRAD_RTOL, f"token logprobs grad T={temperature}", GRAD_ATOL / temperature)


def test_padding_ids_excluded_and_refused():
    """`vocab_size`: padding logits (huge here) take no mass and no gradient; ids there are refused."""
    logits = randn((6, 32), 121)
    logits[:, 27:] = 1e6
    ids = torch.randint(0, 27, (6,), generator=torch.Generator().manual_seed(122))
    weights = randn((6,), 123, 1.0)
    got, grad = logprobs_and_grad(logits, ids, weights, temperature=1.3, vocab_size=27)
    want, want_grad = reference_and_grad(logits, ids, weights, 1.3, vocab_size=27)
    assert_close(got, want, VALUE_RTOL, "padded token logprobs")
    assert_close(grad, want_grad, GRAD_RTOL, "padded token logprobs grad", GRAD_ATOL)
    assert (grad[:, 27:] == 0).all(), "padding logits got a gradient"
    with pytest.raises(ValueError, match="token_ids contains ids outside"):
        vocab_parallel_token_logprobs(logits, torch.tensor([0, 1, 2, 3, 4, 27]), vocab_size=27)
    with pytest.raises(ValueError, match="temperature=0"):
        vocab_parallel_token_logprobs(logits, ids, temperature=0.0)


def test_gradcheck_float64():
    logits = randn((4, 9), 131).double().requires_grad_(True)
    ids = torch.tensor([0, 8, 3, 3])
    assert torch.autograd.gradcheck(lambda x: vocab_parallel_token_logprobs(x, ids, temperature=1.5), (logits,))


# ------------------------------------------------------------------ TP = 2 and 4


@functools.cache
def tp_case() -> dict:
    shape = (4, 5)
    return {"logits": randn((*shape, TP_VOCAB), 460), "temperature": 0.7, "weights": randn(shape, 202, 1.0),
            "ids": torch.randint(0, TP_VOCAB, shape, generator=torch.Generator().manual_seed(461))}


def tp_rank_body(tp: int, case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank body: value and this shard's gradient."""
    rank = tp_rank(tp)
    return logprobs_and_grad(shard(case["logits"], tp, rank), case["ids"], case["weights"],
                             temperature=case["temperature"])


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_value_and_gradient(tp):
    case = tp_case()
    per_rank = run_distributed(tp_rank_body, tp, tp, case, timeout=300.0)
    want, want_grad = reference_and_grad(case["logits"], case["ids"], case["weights"], case["temperature"])
    for rank, (value, _) in enumerate(per_rank):
        assert value.dtype == torch.float32
        assert_close(value, want, VALUE_RTOL, f"TP={tp} token logprobs rank {rank}")
    grad = torch.cat([grad for _, grad in per_rank], dim=-1)
    assert_close(grad, want_grad, GRAD_RTOL, f"TP={tp} token logprobs grad", GRAD_ATOL / case["temperature"])


# ------------------------------------------------------------- fused with the LM head


N, HIDDEN, VOCAB = 64, 8, 40


def fused_on_rank(tp: int) -> tuple:
    """fused_linear_token_logprobs on this rank's head shard: value and grads (float64)."""
    rank = tp_rank(tp)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, HIDDEN, generator=generator, dtype=torch.float64).requires_grad_()
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.float64) * 0.8
    ids = torch.randint(0, VOCAB - 3, (N,), generator=torch.Generator().manual_seed(4))
    head = weight.chunk(tp)[rank].clone().requires_grad_()
    logp = fused_linear_token_logprobs(hidden, head, ids, temperature=0.8, vocab_size=VOCAB - 3, chunk_size=5)
    assert logp.requires_grad, "fused token log-probs are not differentiable"
    (logp * torch.linspace(-1, 1, N, dtype=logp.dtype)).sum().backward()
    return logp.detach(), hidden.grad, head.grad, ids, hidden.detach(), weight


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_matches_log_softmax(tp):
    results = run_distributed(fused_on_rank, tp, tp) if tp > 1 else [fused_on_rank(1)]
    _, _, _, ids, hidden, weight = results[0]
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = (hidden @ weight.T)[:, : VOCAB - 3] / 0.8
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1)
    (expected * torch.linspace(-1, 1, N, dtype=expected.dtype)).sum().backward()
    for logp, hidden_grad, head_grad, *_ in results:
        torch.testing.assert_close(logp.double(), expected.detach(), rtol=1e-6, atol=1e-6)
        assert hidden_grad is not None and head_grad is not None
    # Each rank's hidden grad comes from its vocab shard; the caller all-reduces them, as
    # Megatron's column-parallel output layer does.
    torch.testing.assert_close(sum(result[1] for result in results), hidden.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([result[2] for result in results]), weight.grad, rtol=1e-6, atol=1e-6)
