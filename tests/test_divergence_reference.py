"""The divergence kernel against a dense float64 reference written here, at TP = 1, 2, 4.

The reference takes full logits, applies temperature and padding, forms both
distributions over the true vocab and evaluates the textbook formulas; gradients
come from autograd through it. Nothing of the kernel is reused.
"""


import pytest
import torch
import torch.nn.functional as F

from megatron_opd.ops import (
    sparse_teacher_divergence,
    vocab_parallel_divergence,
    vocab_parallel_sample,
    vocab_parallel_token_logprobs,
)
from megatron_opd.testing import run_distributed

FP32_VALUE_TOL = 2e-5  # relative to max(1, |reference|)
FP32_GRAD_TOL = 2e-5


# ----------------------------------------------------------------------- reference


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q), 0 log 0 = 0; both branches finite so autograd gives no NaN."""
    present = logp.exp() > 0
    safe_logp, safe_logq = torch.where(present, logp, 0.0), torch.where(present, logq, 0.0)
    return torch.where(present, safe_logp.exp() * (safe_logp - safe_logq), 0.0).sum(-1)


def _divergence(logp_s, logp_t, beta):
    if beta == 0:
        return _kl(logp_t, logp_s)
    if beta == 1:
        return _kl(logp_s, logp_t)
    m = beta * logp_t.exp() + (1 - beta) * logp_s.exp()
    log_m = torch.log(torch.where(m > 0, m, 1.0))  # m = 0 only where both p are 0
    return beta * _kl(logp_t, log_m) + (1 - beta) * _kl(logp_s, log_m)


def reference(student, teacher, *, beta, temperature=1.0, topk=None, normalize="renorm",
              vocab_size=None, mask=None):
    """Mean divergence over counted tokens, float64, from full logits `[N, V]`."""
    vocab_size = vocab_size or student.shape[-1]
    logp_s = F.log_softmax(student[:, :vocab_size].double() / temperature, -1)
    logp_t = F.log_softmax(teacher[:, :vocab_size].double() / temperature, -1)
    if topk is not None:
        ids = logp_t.topk(topk, -1).indices
        logp_s, logp_t = logp_s.gather(-1, ids), logp_t.gather(-1, ids)
        if normalize == "renorm":
            logp_s, logp_t = F.log_softmax(logp_s, -1), F.log_softmax(logp_t, -1)
        elif normalize == "tail":
            tail = lambda lp: torch.log1p(-lp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-15))  # noqa: E731
            logp_s = torch.cat([logp_s, tail(logp_s)], -1)
            logp_t = torch.cat([logp_t, tail(logp_t)], -1)
    per_token = _divergence(logp_s, logp_t, beta)
    if mask is not None:
        per_token = per_token[mask]
    return per_token.sum() / max(per_token.numel(), 1)


def reference_value_and_grad(student, teacher, **kwargs):
    leaf = student.double().clone().requires_grad_()
    value = reference(leaf, teacher.double(), **kwargs)
    value.backward()
    return value.detach(), leaf.grad


def close(actual, expected, tolerance):
    scale = max(1.0, expected.abs().max().item())
    return (actual.double() - expected.double()).abs().max().item() <= tolerance * scale


def logits(tokens, vocab, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, vocab, generator=generator) * scale


# ------------------------------------------------------------------------- TP = 1

GRID = [(beta, tau, topk, norm) for beta in (0.0, 0.1, 0.5, 0.9, 1.0) for tau in (0.5, 1.0, 2.0)
        for topk, norm in ((None, "renorm"), (1, "renorm"), (8, "renorm"), (8, "full"), (8, "tail"))]


@pytest.mark.parametrize("beta,tau,topk,norm", GRID)
def test_tp1_value_and_grad_match_float64(beta, tau, topk, norm):
    student, teacher = logits(6, 40, 0), logits(6, 40, 1)
    mask = torch.tensor([1, 1, 0, 1, 1, 0], dtype=torch.bool)
    kwargs = dict(beta=beta, temperature=tau, topk=topk, mask=mask)
    leaf = student.clone().requires_grad_()
    value = vocab_parallel_divergence(leaf, teacher, topk_normalize=norm, chunk_size=2, **kwargs)
    value.backward()
    expected, expected_grad = reference_value_and_grad(student, teacher, normalize=norm, **kwargs)
    assert close(value, expected, FP32_VALUE_TOL)
    assert close(leaf.grad, expected_grad, FP32_GRAD_TOL)
    assert leaf.grad[~mask].abs().max() == 0


@pytest.mark.parametrize("beta,topk,norm", [(0.0, None, "renorm"), (0.5, None, "renorm"), (1.0, None, "renorm"),
                                           (0.5, 4, "renorm"), (1.0, 4, "tail"), (0.0, 4, "full")])
def test_gradcheck_float64(beta, topk, norm):
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(3, 12, dtype=torch.float64, generator=generator).requires_grad_()
    teacher = torch.randn(3, 12, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_divergence(x, teacher, beta=beta, temperature=1.3, topk=topk,
                                            topk_normalize=norm, reduction="none"), (student,))


def test_reductions_and_all_masked():
    student, teacher = logits(5, 16, 3), logits(5, 16, 4)
    mask = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    per_token = vocab_parallel_divergence(student, teacher, mask=mask, reduction="none")
    assert per_token.shape == (5,) and per_token.dtype == torch.float32
    assert per_token[~mask].abs().max() == 0
    total = vocab_parallel_divergence(student, teacher, mask=mask, reduction="sum")
    mean = vocab_parallel_divergence(student, teacher, mask=mask, reduction="mean")
    assert torch.allclose(total, per_token.sum()) and torch.allclose(mean, total / 3)
    for topk in (None, 4):
        leaf = student.clone().requires_grad_()
        none_counted = vocab_parallel_divergence(leaf, teacher, topk=topk, mask=torch.zeros(5, dtype=torch.bool))
        none_counted.backward()
        assert none_counted.item() == 0.0 and not torch.isnan(none_counted)
        assert leaf.grad.abs().max() == 0


def test_padding_ids_are_excluded_even_with_huge_logits():
    student, teacher = logits(4, 32, 5), logits(4, 32, 6)
    student[:, 27:] = 1e4
    teacher[:, 27:] = 1e4
    for topk in (None, 3):
        leaf = student.clone().requires_grad_()
        value = vocab_parallel_divergence(leaf, teacher, beta=0.5, topk=topk, vocab_size=27)
        value.backward()
        expected, expected_grad = reference_value_and_grad(student, teacher, beta=0.5, topk=topk, vocab_size=27)
        assert close(value, expected, FP32_VALUE_TOL)
        assert close(leaf.grad, expected_grad, FP32_GRAD_TOL)
        assert leaf.grad[:, 27:].abs().max() == 0


def test_large_magnitudes_and_shared_minus_inf():
    student, teacher = logits(4, 24, 7, scale=3e3), logits(4, 24, 8, scale=3e3)
    student[:, 5] = teacher[:, 5] = float("-inf")
    student[0, 0], teacher[1, 1] = 1e4, -1e4
    for beta in (0.0, 0.5, 1.0):
        leaf = student.clone().requires_grad_()
        value = vocab_parallel_divergence(leaf, teacher, beta=beta, temperature=100.0)
        value.backward()
        expected, expected_grad = reference_value_and_grad(student, teacher, beta=beta, temperature=100.0)
        assert torch.isfinite(value) and torch.isfinite(leaf.grad).all()
        assert close(value, expected, FP32_VALUE_TOL)
        assert close(leaf.grad, expected_grad, FP32_GRAD_TOL)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_bf16_inputs_give_a_nonnegative_accurate_divergence(beta):
    # Near-identical distributions: the divergence is tiny, where bf16 math goes negative.
    student = logits(64, 512, 9).bfloat16()
    teacher = (student.float() + 0.01 * logits(64, 512, 10)).bfloat16()
    per_token = vocab_parallel_divergence(student, teacher, beta=beta, reduction="none")
    assert (per_token >= 0).all()
    expected = reference(student.float(), teacher.float(), beta=beta)  # on the bf16-rounded values
    assert abs(per_token.mean().item() - expected.item()) <= 1e-4 * max(expected.item(), 1e-3) + 1e-7


def test_argument_errors_name_the_argument():
    student, teacher = logits(2, 8, 11), logits(2, 8, 12)
    for kwargs, name in [({"beta": 1.5}, "beta=1.5"), ({"beta": -0.1}, "beta=-0.1"),
                         ({"temperature": 0.0}, "temperature=0.0"), ({"topk": 0}, "topk=0"),
                         ({"topk": 9}, "topk=9"), ({"topk": 2, "topk_normalize": "soft"}, "topk_normalize='soft'"),
                         ({"reduction": "avg"}, "reduction='avg'")]:
        with pytest.raises(ValueError, match=name.replace("(", r"\(")):
            vocab_parallel_divergence(student, teacher, **kwargs)


def test_sparse_teacher_equals_local_topk_and_accepts_server_logprobs():
    student, teacher = logits(5, 30, 13), logits(5, 30, 14)
    logp_t = F.log_softmax(teacher.double(), -1)
    top = logp_t.topk(6, -1)
    for normalize in ("renorm", "full", "tail"):
        sparse = sparse_teacher_divergence(student, top.values.float(), top.indices, beta=0.3, normalize=normalize)
        local = vocab_parallel_divergence(student, teacher, beta=0.3, topk=6, topk_normalize=normalize)
        assert torch.allclose(sparse, local, rtol=1e-4, atol=1e-6), normalize
    with pytest.raises(ValueError, match="teacher_topk_ids contains ids outside"):
        sparse_teacher_divergence(student, top.values.float(), top.indices + 30, beta=0.3)


def test_token_logprobs_match_log_softmax():
    student = logits(7, 33, 15)
    ids = torch.randint(0, 33, (7,), generator=torch.Generator().manual_seed(0))
    leaf = student.clone().requires_grad_()
    got = vocab_parallel_token_logprobs(leaf, ids, temperature=0.7)
    got.sum().backward()
    ref_leaf = student.double().clone().requires_grad_()
    expected = F.log_softmax(ref_leaf / 0.7, -1).gather(-1, ids[:, None]).squeeze(-1)
    expected.sum().backward()
    assert close(got, expected, 1e-6) and close(leaf.grad, ref_leaf.grad, 1e-6)


def test_sampling_matches_the_softmax_chi_square():
    vocab, draws = 16, 20000
    base = torch.linspace(-2.0, 1.5, vocab)
    ids = vocab_parallel_sample(base.expand(draws, vocab), temperature=0.8,
                                generator=torch.Generator().manual_seed(123))
    observed = torch.bincount(ids, minlength=vocab).double()
    expected = torch.softmax(base.double() / 0.8, -1) * draws
    chi_square = ((observed - expected) ** 2 / expected).sum().item()
    assert chi_square < 37.70  # chi-square critical value, 15 degrees of freedom, p = 0.001
    top3 = vocab_parallel_sample(base.expand(2000, vocab), temperature=1.0, top_k=3,
                                 generator=torch.Generator().manual_seed(1))
    assert set(top3.tolist()) == {13, 14, 15}
    greedy = vocab_parallel_sample(base.expand(4, vocab), temperature=0.0)
    assert greedy.tolist() == [15] * 4


# ------------------------------------------------------------------------ TP = 2, 4

TP_CASES = [(beta, tau, topk, norm, vocab_size) for beta in (0.0, 0.5, 1.0) for tau in (0.7, 1.5)
            for topk, norm in ((None, "renorm"), (8, "renorm"), (8, "full"), (8, "tail"))
            for vocab_size in (24, 21)]


def shards_on_rank(student, teacher, mask, tp) -> dict:
    """Each TP rank: values, its gradient shard, token logprobs and samples for TP_CASES."""
    from megatron.core import parallel_state

    from megatron_opd.config import ParallelConfig
    from megatron_opd.runtime import initialize_runtime

    initialize_runtime(ParallelConfig(tensor_model_parallel_size=tp))
    rank = parallel_state.get_tensor_model_parallel_rank()
    student_shard, teacher_shard = student.chunk(tp, -1)[rank], teacher.chunk(tp, -1)[rank]
    results = []
    for beta, tau, topk, norm, vocab_size in TP_CASES:
        leaf = student_shard.clone().requires_grad_()
        value = vocab_parallel_divergence(leaf, teacher_shard, beta=beta, temperature=tau, topk=topk,
                                          topk_normalize=norm, vocab_size=vocab_size, mask=mask, chunk_size=3)
        value.backward()
        results.append((value.detach(), leaf.grad))
    ids = torch.arange(student.shape[0]) % 20
    return {
        "cases": results,
        "logprobs": vocab_parallel_token_logprobs(student_shard, ids, temperature=0.9),
        "samples": vocab_parallel_sample(student_shard, temperature=1.0, top_k=5,
                                         generator=torch.Generator().manual_seed(7)),
    }


@pytest.fixture(scope="module")
def tp_inputs():
    student, teacher = logits(7, 24, 16), logits(7, 24, 17)
    student[:, 2] = teacher[:, 2] = float("-inf")
    mask = torch.tensor([1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    return student, teacher, mask


@pytest.fixture(scope="module")
def tp1_results(tp_inputs):
    return run_distributed(shards_on_rank, 1, *tp_inputs, 1)[0]


@pytest.mark.parametrize("tp", [2, 4])  # at TP=4 a shard holds 6 ids, fewer than K=8
def test_tp_matches_tp1_and_float64(tp, tp_inputs, tp1_results):
    student, teacher, mask = tp_inputs
    ranks = run_distributed(shards_on_rank, tp, *tp_inputs, tp)
    for index, (beta, tau, topk, norm, vocab_size) in enumerate(TP_CASES):
        values = [rank["cases"][index][0] for rank in ranks]
        assert all(torch.equal(v, values[0]) for v in values)  # identical on every rank
        grad = torch.cat([rank["cases"][index][1] for rank in ranks], -1)
        tp1_value, tp1_grad = tp1_results["cases"][index]
        case = (beta, tau, topk, norm, vocab_size)
        assert close(values[0], tp1_value, FP32_VALUE_TOL), case
        assert close(grad, tp1_grad, FP32_GRAD_TOL), case  # no factor tp, no lost softmax term
        expected, expected_grad = reference_value_and_grad(
            student, teacher, beta=beta, temperature=tau,
            topk=topk, normalize=norm, vocab_size=vocab_size, mask=mask)
        assert close(values[0], expected, FP32_VALUE_TOL), case
        assert close(grad, expected_grad, FP32_GRAD_TOL), case
    expected_logprobs = F.log_softmax(student.double() / 0.9, -1).gather(
        -1, (torch.arange(7) % 20)[:, None]).squeeze(-1)
    for rank in ranks:
        assert close(rank["logprobs"], expected_logprobs, 1e-6)
        assert torch.equal(rank["samples"], ranks[0]["samples"])
    assert torch.equal(ranks[0]["samples"], tp1_results["samples"])  # TP size does not change samples
