"""`megatron_opd.ops.divergence` against an independent dense float64 reference.

The reference (`tests/divergence_reference.py`) takes the full, unsharded logits,
forms P_T and P_S over the true vocab in float64 and evaluates the textbook
formulas; its gradients come from autograd through them. Nothing of the
implementation is used for expected values.

TP=1 runs in this process (no Megatron state: no TP). TP=2 and TP=4 run one
`run_distributed` launch each, shared by every multi-rank test through a cache:
each rank evaluates the whole case grid on its vocab shard and the parent
re-assembles the shard gradients.

Tolerances (`assert_close`): max |got - want| <= rtol * scale + atol over the whole
compared tensor, scale = max |want| unless stated (a norm-wise relative error), plus
an absolute floor that is the float32 rounding of the terms the quantity is made of:

* per-token values: VALUE_RTOL * max |want| + VALUE_ATOL. A divergence is a sum of
  p * (log p - log q) with log-probs of O(1-10), so float32 leaves ~1e-7 * |log p|
  absolute error however small the divergence is (near-identical distributions).
* "sum" / "mean": scale = sum |per-token reference| (a sum of mixed-sign "full"
  values cancels), floor VALUE_ATOL per counted token (divided by the count for mean).
* gradients: GRAD_RTOL * max |want| + GRAD_ATOL * (token weight) / temperature. An entry
  is a_j - p_j * sum(a), a difference of O(p_j / T) terms, so its float32 error scales
  with the softmax Jacobian (O(1/T) per token), not with the entry.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from megatron_opd.testing import run_distributed
from tests import divergence_reference as ref
from tests.ops_helpers import assert_close, randn, shard, tp_rank

# float32 inputs against the float64 reference on the same (float32) values.
VALUE_RTOL = 1e-5
GRAD_RTOL = 1e-5
# bf16 inputs: the reference runs on the bf16-rounded values (exact in float64), so
# the only error is the implementation's fp32 arithmetic: the fp32 bound applies
# (plus VALUE_ATOL, which matters for the small divergences of near-identical pairs).
BF16_RTOL = 1e-5
VALUE_ATOL = 2e-6  # per token, ~16 float32 eps times |log p|
GRAD_ATOL = 1e-6  # per unit token weight, times 1 / temperature
# TP=k against the implementation at TP=1: same float32 math, different reduction order.
PARITY_RTOL = 1e-5

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (0.5, 1.0, 2.0)
# (topk, topk_normalize); None = full vocab.
MODES = ((None, "renorm"), (1, "renorm"), (1, "full"), (1, "tail"),
         (8, "renorm"), (8, "full"), (8, "tail"))
TRUE_DIVERGENCE_MODES = ((None, "renorm"), (8, "renorm"), (8, "tail"))


def _api():
    from megatron_opd.ops import divergence
    return divergence


# ------------------------------------------------------------------------ helpers


def random_mask(shape, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=generator) < 0.7
    flat = mask.view(-1)
    flat[0], flat[-1] = True, False  # at least one counted and one masked token
    return mask


def mode_kwargs(topk, normalize) -> dict:
    return {} if topk is None else {"topk": topk, "topk_normalize": normalize}


def evaluate(call, student: torch.Tensor, weights: torch.Tensor) -> dict:
    """Values of reduction none/sum/mean, the gradient of mean and of sum(weights * none).

    `call(student, reduction)` runs the function under test on `student` (a leaf).
    """
    out = {}
    leaf = student.detach().clone().requires_grad_(True)
    none = call(leaf, "none")
    (none.double() * weights.double()).sum().backward()
    out["none"], out["grad_none"], out["none_dtype"] = none.detach(), leaf.grad.detach().clone(), none.dtype
    leaf.grad = None
    mean = call(leaf, "mean")
    mean.backward()
    out["mean"], out["grad_mean"] = mean.detach(), leaf.grad.detach().clone()
    with torch.no_grad():
        out["sum"] = call(leaf, "sum").detach()
    return out


def reference_evaluate(per_token_of, student: torch.Tensor, mask, weights: torch.Tensor) -> dict:
    """The same quantities from the float64 reference; `per_token_of(student64)`."""
    leaf = student.detach().double().requires_grad_(True)
    per_token = per_token_of(leaf)
    none = ref.reduce(per_token, mask, "none")
    mean = ref.reduce(per_token, mask, "mean")
    total = ref.reduce(per_token, mask, "sum")
    grad_none, = torch.autograd.grad((none * weights.double()).sum(), leaf, retain_graph=True)
    grad_mean, = torch.autograd.grad(mean, leaf)
    count = int(mask.sum()) if mask is not None else per_token.numel()
    return {"none": none.detach(), "mean": mean.detach(), "sum": total.detach(),
            "grad_none": grad_none, "grad_mean": grad_mean,
            # scales for the tolerances (see the module docstring)
            "count": count, "abs_sum": none.detach().abs().sum().item(),
            "weight_max": weights.abs().max().item()}


def compare(got: dict, want: dict, what: str, temperature: float = 1.0, value_rtol=VALUE_RTOL,
            grad_rtol=GRAD_RTOL, scales: dict | None = None) -> None:
    """Values and gradients of `evaluate` against `reference_evaluate` (or scales from one)."""
    scales = scales or want
    count = max(scales["count"], 1)
    assert_close(got["none"], want["none"], value_rtol, f"{what} [none]", VALUE_ATOL)
    assert_close(got["sum"], want["sum"], value_rtol, f"{what} [sum]", VALUE_ATOL * count, scales["abs_sum"])
    assert_close(got["mean"], want["mean"], value_rtol, f"{what} [mean]", VALUE_ATOL,
                 scales["abs_sum"] / count)
    assert_close(got["grad_mean"], want["grad_mean"], grad_rtol, f"{what} [grad_mean]",
                 GRAD_ATOL / (temperature * count))
    assert_close(got["grad_none"], want["grad_none"], grad_rtol, f"{what} [grad_none]",
                 GRAD_ATOL * scales["weight_max"] / temperature)


def dense_call(teacher, mask, **kwargs):
    def call(student, reduction):
        return _api().vocab_parallel_divergence(student, teacher, mask=mask, reduction=reduction, **kwargs)
    return call


def dense_reference(student, teacher, mask, weights, **kwargs) -> dict:
    kwargs = dict(kwargs)
    kwargs.pop("chunk_size", None)
    normalize = kwargs.pop("topk_normalize", "renorm")
    return reference_evaluate(
        lambda s: ref.dense_divergence(s, teacher.double(), normalize=normalize, **kwargs), student, mask, weights)


def sparse_call(teacher_logp, ids, mask, **kwargs):
    def call(student, reduction):
        return _api().sparse_teacher_divergence(student, teacher_logp, ids, mask=mask, reduction=reduction,
                                                **kwargs)
    return call


def sparse_reference(student, teacher_logp, ids, mask, weights, **kwargs) -> dict:
    return reference_evaluate(lambda s: ref.sparse_divergence(s, teacher_logp, ids, **kwargs),
                              student, mask, weights)


# ------------------------------------------------------------------ the reference


def test_reference_matches_textbook_identities():
    """The reference itself: KL against F.kl_div, JSD bounds and symmetry, renorm K=V = full."""
    student, teacher = randn((6, 20), 1), randn((6, 20), 2)
    logp_s, logp_t = ref.log_probs(student, 1.0), ref.log_probs(teacher, 1.0)
    fkl = torch.nn.functional.kl_div(logp_s, logp_t, log_target=True, reduction="none").sum(-1)
    assert_close(ref.dense_divergence(student, teacher, beta=0.0), fkl, 1e-12, "forward KL")
    rkl = torch.nn.functional.kl_div(logp_t, logp_s, log_target=True, reduction="none").sum(-1)
    assert_close(ref.dense_divergence(student, teacher, beta=1.0), rkl, 1e-12, "reverse KL")
    jsd = ref.dense_divergence(student, teacher, beta=0.5)
    assert (jsd > 0.05).all() and (jsd <= math.log(2)).all()
    # JSD_beta(T, S) = JSD_{1-beta}(S, T)
    assert_close(ref.dense_divergence(student, teacher, beta=0.3),
                 ref.dense_divergence(teacher, student, beta=0.7), 1e-12, "JSD symmetry")
    for normalize in ("renorm", "full", "tail"):
        assert_close(ref.dense_divergence(student, teacher, beta=0.5, topk=20, normalize=normalize), jsd,
                     1e-12, f"K=V {normalize}")
    # "full" forward KL over K ids can be negative; "tail" and "renorm" cannot.
    values = {n: ref.dense_divergence(student, teacher, beta=0.0, topk=3, normalize=n)
              for n in ("renorm", "full", "tail")}
    assert (values["renorm"] >= 0).all() and (values["tail"] >= 0).all()
    assert (values["tail"] <= fkl + 1e-12).all()  # data processing inequality


def test_comparison_bites():
    """`compare` rejects a factor-of-2 gradient (a differentiable all-reduce at TP=2) and a
    1e-4 relative error in the values."""
    shape, vocab = (3, 5), 40
    student, teacher = randn((*shape, vocab), 5), randn((*shape, vocab), 6)
    mask, weights = random_mask(shape, 7), randn(shape, 8, 1.0)
    want = dense_reference(student, teacher, mask, weights, beta=0.5)
    compare(dict(want), want, "identical")
    doubled = dict(want, grad_mean=2 * want["grad_mean"])
    with pytest.raises(AssertionError, match="grad_mean"):
        compare(doubled, want, "doubled gradient")
    off = dict(want, none=want["none"] * (1 + 1e-4))
    with pytest.raises(AssertionError, match="none"):
        compare(off, want, "values 1e-4 off")


# ------------------------------------------------------------------ TP=1 value grid


@pytest.mark.parametrize("topk,normalize", MODES, ids=[f"top{k}-{n}" if k else "full_vocab" for k, n in MODES])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_tp1_matches_reference(beta, temperature, topk, normalize):
    seed = int(beta * 100) * 1000 + int(temperature * 10) * 10 + (topk or 0)
    shape, vocab = (3, 5), 40
    student, teacher = randn((*shape, vocab), seed), randn((*shape, vocab), seed + 1)
    mask, weights = random_mask(shape, seed + 2), randn(shape, seed + 3, 1.0)
    kwargs = dict(beta=beta, temperature=temperature, **mode_kwargs(topk, normalize))
    got = evaluate(dense_call(teacher, mask, **kwargs), student, weights)
    want = dense_reference(student, teacher, mask, weights, **kwargs)
    compare(got, want, f"beta={beta} T={temperature} topk={topk} {normalize}", temperature)
    assert got["none_dtype"] == torch.float32
    assert (got["none"][~mask] == 0).all(), "reduction='none' must be 0 at masked tokens"
    # Masked tokens get no gradient.
    assert (got["grad_mean"][~mask] == 0).all() and (got["grad_none"][~mask] == 0).all()
    if not (topk == 1 and normalize == "renorm"):
        assert want["none"].abs().max() > 1e-3, "degenerate case"


def test_reduction_conventions_and_shapes():
    api = _api()
    student, teacher = randn((2, 3, 4, 16), 11), randn((2, 3, 4, 16), 12)
    mask = random_mask((2, 3, 4), 13)
    none = api.vocab_parallel_divergence(student, teacher, beta=0.5, mask=mask, reduction="none")
    assert none.shape == (2, 3, 4) and none.dtype == torch.float32
    total = api.vocab_parallel_divergence(student, teacher, beta=0.5, mask=mask, reduction="sum")
    mean = api.vocab_parallel_divergence(student, teacher, beta=0.5, mask=mask, reduction="mean")
    assert total.dim() == 0 and mean.dim() == 0
    assert_close(total, none.double().sum(), 1e-6, "sum = sum of none")
    assert_close(mean, none.double().sum() / mask.sum(), 1e-6, "mean = sum / counted")
    # No mask: every token counts; default reduction is mean.
    default = api.vocab_parallel_divergence(student, teacher)
    want = ref.dense_divergence(student, teacher, beta=0.5).mean()
    assert_close(default, want, VALUE_RTOL, "defaults (beta=0.5, mean, no mask)")


@pytest.mark.parametrize("chunk_size", [1, 4, 7])
def test_chunk_size_does_not_change_the_result(chunk_size):
    shape, vocab = (4, 5), 32
    student, teacher = randn((*shape, vocab), 21), randn((*shape, vocab), 22)
    mask, weights = random_mask(shape, 23), randn(shape, 24, 1.0)
    for topk, normalize in ((None, "renorm"), (8, "tail")):
        kwargs = dict(beta=0.5, temperature=1.0, **mode_kwargs(topk, normalize))
        got = evaluate(dense_call(teacher, mask, chunk_size=chunk_size, **kwargs), student, weights)
        compare(got, dense_reference(student, teacher, mask, weights, **kwargs),
                f"chunk_size={chunk_size} topk={topk}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_masked_rows_with_reused_chunk_buffers(chunk_size, threads):
    """The full-vocab kernel gathers masked rows into buffers reused chunk after chunk and writes each
    row's gradient once (no zero-fill for unmasked calls): a stale buffer row, a row written to the
    wrong place or a missing zero at an unselected token shows here. Whole masked-out rows (the first
    of each sequence), -inf logits, vocab padding, T != 1; float64 reference. With 2 intra-op threads
    the chunks run on two workers, each with its own buffers."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_masked_rows(chunk_size)
    finally:
        torch.set_num_threads(previous_threads)


def _check_masked_rows(chunk_size):
    shape, vocab = (3, 7), 40
    student, teacher = randn((*shape, vocab), 81), randn((*shape, vocab), 82, 3.0)
    dead = torch.rand(*shape, vocab, generator=torch.Generator().manual_seed(83)) < 0.1
    student[dead] = teacher[dead] = float("-inf")  # both rule these out (the reference's KL is finite)
    mask = random_mask(shape, 84)
    mask[:, 0] = False
    weights = randn(shape, 85, 1.0)
    failures = []
    for beta in (0.0, 0.5, 1.0):
        for temperature, vocab_size in ((1.0, None), (0.7, vocab - 5)):
            kwargs = dict(beta=beta, temperature=temperature, vocab_size=vocab_size)
            what = f"chunk_size={chunk_size} beta={beta} T={temperature} vocab_size={vocab_size}"
            try:
                got = evaluate(dense_call(teacher, mask, chunk_size=chunk_size, **kwargs), student, weights)
                compare(got, dense_reference(student, teacher, mask, weights, **kwargs), what, temperature)
                assert (got["grad_none"][~mask] == 0).all(), f"{what}: masked tokens got a gradient"
                assert (got["none"][~mask] == 0).all(), f"{what}: masked tokens got a value"
            except AssertionError as error:
                failures.append(str(error).splitlines()[0])
    assert not failures, f"{len(failures)} of 6 cases fail:\n" + "\n".join(failures)


def test_teacher_gets_no_gradient():
    student = randn((4, 16), 31).requires_grad_(True)
    teacher = randn((4, 16), 32).requires_grad_(True)
    for kwargs in ({}, {"topk": 4}):
        for beta in (0.0, 0.5, 1.0):
            loss = _api().vocab_parallel_divergence(student, teacher, beta=beta, **kwargs)
            loss.backward()
            assert teacher.grad is None or (teacher.grad == 0).all(), f"teacher got a gradient ({beta}, {kwargs})"
    assert student.grad is not None and student.grad.abs().max() > 0


# --------------------------------------------------------------- masks, padding


@pytest.mark.parametrize("topk,normalize", MODES, ids=[f"top{k}-{n}" if k else "full_vocab" for k, n in MODES])
def test_all_masked_mean_is_exactly_zero(topk, normalize):
    shape, vocab = (2, 3), 24
    for beta in (0.0, 0.5, 1.0):
        student = randn((*shape, vocab), 41).requires_grad_(True)
        teacher = randn((*shape, vocab), 42)
        mask = torch.zeros(shape, dtype=torch.bool)
        kwargs = dict(beta=beta, temperature=1.0, mask=mask, **mode_kwargs(topk, normalize))
        mean = _api().vocab_parallel_divergence(student, teacher, reduction="mean", **kwargs)
        assert mean.item() == 0.0 and not torch.isnan(mean), f"mean over no tokens = {mean}"
        mean.backward()
        assert student.grad is not None and (student.grad == 0).all(), "all-masked mean must give zero grad"
        total = _api().vocab_parallel_divergence(student, teacher, reduction="sum", **kwargs)
        assert total.item() == 0.0
        none = _api().vocab_parallel_divergence(student, teacher, reduction="none", **kwargs)
        assert none.shape == shape and (none == 0).all()


PAD_MODES = ((None, "renorm"), (8, "renorm"), (8, "full"), (8, "tail"))


@pytest.mark.parametrize("topk,normalize", PAD_MODES, ids=[f"top{k}-{n}" if k else "full_vocab" for k, n in PAD_MODES])
def test_padded_vocab_is_excluded(topk, normalize):
    shape, padded, vocab_size = (3, 4), 40, 33
    for beta in (0.0, 0.5, 1.0):
        student, teacher = randn((*shape, padded), 51), randn((*shape, padded), 52)
        # Padding with huge logits would dominate both softmaxes if it were counted.
        student[..., vocab_size:] = 1e6
        teacher[..., vocab_size:] = 3e5
        mask, weights = random_mask(shape, 53), randn(shape, 54, 1.0)
        kwargs = dict(beta=beta, temperature=2.0, vocab_size=vocab_size, **mode_kwargs(topk, normalize))
        got = evaluate(dense_call(teacher, mask, **kwargs), student, weights)
        compare(got, dense_reference(student, teacher, mask, weights, **kwargs), f"padded beta={beta}", 2.0)
        assert (got["grad_mean"][..., vocab_size:] == 0).all(), "padding logits got a gradient"


# ------------------------------------------------------------ extreme magnitudes


def extreme_logits(shape, vocab, seed, offset=0.0):
    """Uniform in [-1e4, 1e4] (or offset + O(3)) with -inf at 5 ids per token, the same ids in both."""
    generator = torch.Generator().manual_seed(seed)
    if offset:
        student = offset + 3 * torch.randn(*shape, vocab, generator=generator)
        teacher = offset + 3 * torch.randn(*shape, vocab, generator=generator)
    else:
        student = (torch.rand(*shape, vocab, generator=generator) * 2 - 1) * 1e4
        teacher = (torch.rand(*shape, vocab, generator=generator) * 2 - 1) * 1e4
    dead = torch.rand(*shape, vocab, generator=generator).argsort(-1)[..., :5]
    student.scatter_(-1, dead, float("-inf"))
    teacher.scatter_(-1, dead, float("-inf"))
    return student.float(), teacher.float()


EXTREME_MODES = ((None, "renorm"), (8, "renorm"), (8, "full"), (8, "tail"))


@pytest.mark.parametrize("topk,normalize", EXTREME_MODES,
                         ids=[f"top{k}-{n}" if k else "full_vocab" for k, n in EXTREME_MODES])
@pytest.mark.parametrize("offset", [0.0, 1e4, -1e4], ids=["spread_1e4", "offset_+1e4", "offset_-1e4"])
def test_huge_and_infinite_logits(offset, topk, normalize):
    """|logits| up to 1e4 (so |logits / T| up to 2e4) and -inf at the same ids in both models."""
    shape, vocab = (3, 4), 32
    student, teacher = extreme_logits(shape, vocab, 61 + int(offset) % 7, offset)
    mask, weights = random_mask(shape, 62), randn(shape, 63, 1.0)
    failures = []
    for beta in (0.0, 0.5, 1.0):
        for temperature in (0.5, 1.0):
            kwargs = dict(beta=beta, temperature=temperature, **mode_kwargs(topk, normalize))
            what = f"offset={offset} beta={beta} T={temperature} topk={topk} {normalize}"
            try:
                got = evaluate(dense_call(teacher, mask, **kwargs), student, weights)
                for key in ("none", "mean", "sum", "grad_mean", "grad_none"):
                    assert not torch.isnan(got[key]).any(), f"{what}: NaN in {key}"
                compare(got, dense_reference(student, teacher, mask, weights, **kwargs), what, temperature)
                assert (got["grad_mean"][torch.isinf(student)] == 0).all(), f"{what}: -inf logits got a gradient"
            except AssertionError as error:
                failures.append(str(error).splitlines()[0])
    assert not failures, f"{len(failures)} of 6 (beta, T) cases fail:\n" + "\n".join(failures)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_tail_with_zero_tail_mass(beta):
    """"tail" when the K ids hold all the mass: K = vocab, or a tail below float32's range.

    The tail outcome then has probability 0 in both models and contributes 0 (0 log 0 = 0).
    """
    cases = {
        "K=V": (randn((2, 16), 131), randn((2, 16), 132), 16),
        "tail underflows": (torch.tensor([[0.0, -200.0, -300.0, -400.0]]),
                            torch.tensor([[0.0, -200.0, -300.0, -400.0]]), 2),
    }
    failures = []
    for name, (student, teacher, k) in cases.items():
        weights = torch.ones(student.shape[:-1])
        kwargs = dict(beta=beta, topk=k, topk_normalize="tail")
        try:
            got = evaluate(dense_call(teacher, None, **kwargs), student, weights)
            for key in ("none", "mean", "grad_mean"):
                assert torch.isfinite(got[key]).all(), f"{name}: non-finite {key}: {got[key].flatten()[:4].tolist()}"
            compare(got, dense_reference(student, teacher, None, weights, **kwargs), f"{name} beta={beta}")
        except AssertionError as error:
            failures.append(str(error).splitlines()[0])
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------- bf16


def bf16_pairs(mixed: bool) -> dict:
    shape, vocab = (8, 16), 128
    base = randn((*shape, vocab), 71, 3.0)
    # A near-identical pair (small divergences, where a bf16 softmax goes negative) and a far pair.
    pairs = {"near": (base + randn((*shape, vocab), 72, 0.05), base), "far": (randn((*shape, vocab), 73, 3.0), base)}
    return {name: (student.float() if mixed else student.bfloat16(), teacher.bfloat16())
            for name, (student, teacher) in pairs.items()}


@pytest.mark.parametrize("mixed", [False, True], ids=["both_bf16", "bf16_teacher_fp32_student"])
def test_bf16_is_nonnegative_and_close(mixed):
    """>= 0 (full vocab: strictly) and within BF16_RTOL of the reference on the bf16 values."""
    for name, (student, teacher) in bf16_pairs(mixed).items():
        for beta in BETAS:
            for topk, normalize in TRUE_DIVERGENCE_MODES:
                kwargs = dict(beta=beta, temperature=1.0, **mode_kwargs(topk, normalize))
                what = f"bf16 {name} mixed={mixed} beta={beta} topk={topk} {normalize}"
                got = _api().vocab_parallel_divergence(student, teacher, reduction="none", **kwargs)
                assert got.dtype == torch.float32, f"{what}: reduction='none' dtype {got.dtype}"
                # Full vocab: strictly >= 0 (the spec's requirement). Top-K renorm/tail are true
                # divergences too; there a rounding-level -1e-9 of an exact 0 is tolerated.
                floor = 0.0 if topk is None else -1e-9
                assert (got >= floor).all(), f"{what}: negative divergence {got.min().item():.3g}"
                want = ref.dense_divergence(student.double(), teacher.double(), beta=beta, temperature=1.0,
                                            topk=topk, normalize=normalize)
                assert_close(got, want, BF16_RTOL, what, VALUE_ATOL)


@pytest.mark.parametrize("topk,normalize", TRUE_DIVERGENCE_MODES,
                         ids=[f"top{k}-{n}" if k else "full_vocab" for k, n in TRUE_DIVERGENCE_MODES])
def test_bf16_identical_models_give_zero(topk, normalize):
    """D(P, P) = 0: |D| <= 1e-6, and never negative for the full vocab (top-K: >= -1e-9)."""
    base = randn((8, 16, 128), 71, 3.0).bfloat16()
    failures = []
    for beta in BETAS:
        got = _api().vocab_parallel_divergence(base, base.clone(), beta=beta, reduction="none",
                                               **mode_kwargs(topk, normalize))
        floor = 0.0 if topk is None else -1e-9
        if not (got.abs().max() <= 1e-6 and (got >= floor).all()):
            failures.append(f"beta={beta}: D(P, P) in [{got.min().item():.3g}, {got.max().item():.3g}]")
    assert not failures, "\n".join(failures)


def test_bf16_gradient_close_to_reference():
    shape, vocab = (4, 8), 64
    student, teacher = randn((*shape, vocab), 74).bfloat16(), randn((*shape, vocab), 75).bfloat16()
    mask = random_mask(shape, 76)
    for beta in (0.0, 0.5, 1.0):
        leaf = student.clone().requires_grad_(True)
        _api().vocab_parallel_divergence(leaf, teacher, beta=beta, mask=mask, reduction="sum").backward()
        assert leaf.grad.dtype == torch.bfloat16
        s64 = student.double().requires_grad_(True)
        ref.reduce(ref.dense_divergence(s64, teacher.double(), beta=beta), mask, "sum").backward()
        # The gradient is returned in bf16: one bf16 rounding (2^-9 relative) on top.
        assert_close(leaf.grad, s64.grad, 2 ** -8, f"bf16 grad beta={beta}")


# ----------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("beta,topk", [(0.0, None), (0.5, None), (1.0, None), (0.5, 3)],
                         ids=["fkl", "jsd", "rkl", "jsd_top3_renorm"])
def test_gradcheck_float64(beta, topk):
    student = randn((2, 3, 9), 81).double().requires_grad_(True)
    teacher = randn((2, 3, 9), 82).double()
    mask = torch.tensor([[True, False, True], [True, True, True]])
    kwargs = dict(beta=beta, temperature=1.5, mask=mask, reduction="none", **mode_kwargs(topk, "renorm"))
    assert torch.autograd.gradcheck(lambda s: _api().vocab_parallel_divergence(s, teacher, **kwargs),
                                    (student,), eps=1e-6, atol=1e-7, rtol=1e-5)


# -------------------------------------------------------------------------- errors


def test_errors_name_the_argument_and_value():
    api = _api()
    student, teacher = randn((2, 16), 91), randn((2, 16), 92)
    cases = [
        ({"beta": -0.1}, ("beta", "-0.1")),
        ({"beta": 1.5}, ("beta", "1.5")),
        ({"temperature": 0.0}, ("temperature", "0")),
        ({"temperature": -2.0}, ("temperature", "-2")),
        ({"topk": 0}, ("topk", "0")),
        ({"topk": 17}, ("topk", "17")),
        ({"topk": 13, "vocab_size": 12}, ("topk", "13")),
    ]
    for kwargs, words in cases:
        with pytest.raises(ValueError) as info:
            api.vocab_parallel_divergence(student, teacher, **kwargs)
        message = str(info.value)
        for word in words:
            assert word in message, f"{kwargs}: message {message!r} does not name {word!r}"
    ids = torch.tensor([[0, 1], [2, 3]])
    teacher_logp = torch.log_softmax(teacher, -1).gather(-1, ids)
    for kwargs, words in (({"beta": 2.0}, ("beta", "2.0")), ({"temperature": 0.0}, ("temperature", "0"))):
        with pytest.raises(ValueError) as info:
            api.sparse_teacher_divergence(student, teacher_logp, ids, **kwargs)
        assert all(word in str(info.value) for word in words), str(info.value)
    # The edges are valid.
    api.vocab_parallel_divergence(student, teacher, beta=0.0, topk=16)
    api.vocab_parallel_divergence(student, teacher, beta=1.0, topk=1)


# ------------------------------------------------------------------ sparse teacher


def sparse_inputs(shape, vocab, seed, temperature, k, topk_ids: bool):
    student, teacher = randn((*shape, vocab), seed), randn((*shape, vocab), seed + 1)
    logp_t = ref.log_probs(teacher, temperature)
    if topk_ids:
        ids = logp_t.topk(k, -1).indices
    else:
        generator = torch.Generator().manual_seed(seed + 2)
        ids = torch.rand(*shape, vocab, generator=generator).argsort(-1)[..., :k]
    return student, teacher, logp_t.gather(-1, ids).float(), ids


@pytest.mark.parametrize("normalize", ["renorm", "full", "tail"])
def test_sparse_teacher_matches_reference(normalize):
    shape, vocab, k = (3, 4), 32, 6
    mask, weights = random_mask(shape, 101), randn(shape, 102, 1.0)
    for topk_ids in (True, False):
        for beta in (0.0, 0.5, 1.0):
            for temperature in (1.0, 2.0):
                student, teacher, teacher_logp, ids = sparse_inputs(shape, vocab, 103, temperature, k, topk_ids)
                kwargs = dict(beta=beta, temperature=temperature, normalize=normalize)
                what = f"sparse {normalize} topk_ids={topk_ids} beta={beta} T={temperature}"
                got = evaluate(sparse_call(teacher_logp, ids, mask, **kwargs), student, weights)
                compare(got, sparse_reference(student, teacher_logp, ids, mask, weights, **kwargs), what,
                        temperature)
                if topk_ids:  # the teacher's exact top-K logprobs: same as the dense top-K path
                    dense = _api().vocab_parallel_divergence(student, teacher, beta=beta, temperature=temperature,
                                                             topk=k, topk_normalize=normalize, mask=mask,
                                                             reduction="none")
                    assert_close(got["none"], dense, VALUE_RTOL, f"{what} vs dense top-K")


# ------------------------------------------------------------------ TP = 2 and 4


TP_VOCAB = 24  # 12 per shard at TP=2, 6 at TP=4: fewer than K=8 candidates per shard


@functools.cache
def tp_cases() -> dict:
    """name -> case; every tensor is full (unsharded)."""
    shape = (4, 5)
    cases = {}
    mask, weights = random_mask(shape, 201), randn(shape, 202, 1.0)
    modes = ((None, "renorm"), (8, "renorm"), (8, "full"), (8, "tail"))
    for i, beta in enumerate(BETAS):
        for j, (topk, normalize) in enumerate(modes):
            temperature = TEMPERATURES[(i + j) % 3]
            seed = 300 + 10 * i + j
            cases[f"div beta={beta} T={temperature} topk={topk} {normalize}"] = dict(
                kind="div", student=randn((*shape, TP_VOCAB), seed), teacher=randn((*shape, TP_VOCAB), seed + 100),
                mask=mask, weights=weights,
                kwargs=dict(beta=beta, temperature=temperature, **mode_kwargs(topk, normalize)))
    for normalize in ("renorm", "full", "tail"):
        cases[f"div top1 {normalize}"] = dict(
            kind="div", student=randn((*shape, TP_VOCAB), 401), teacher=randn((*shape, TP_VOCAB), 402),
            mask=mask, weights=weights, kwargs=dict(beta=0.5, topk=1, topk_normalize=normalize))
    for vocab_size in (21, 17):  # at TP=4, vocab 17 leaves the last shard all padding
        for beta in (0.0, 0.5, 1.0):
            for topk, normalize in ((None, "renorm"), (8, "tail"), (8, "renorm")):
                student, teacher = randn((*shape, TP_VOCAB), 410 + vocab_size), randn((*shape, TP_VOCAB), 411)
                student[..., vocab_size:], teacher[..., vocab_size:] = 1e6, 3e5
                cases[f"pad{vocab_size} beta={beta} topk={topk} {normalize}"] = dict(
                    kind="div", student=student, teacher=teacher, mask=mask, weights=weights,
                    kwargs=dict(beta=beta, temperature=1.0, vocab_size=vocab_size, **mode_kwargs(topk, normalize)))
    for topk in (None, 8):
        cases[f"all-masked topk={topk}"] = dict(
            kind="div", student=randn((*shape, TP_VOCAB), 420), teacher=randn((*shape, TP_VOCAB), 421),
            mask=torch.zeros(shape, dtype=torch.bool), weights=weights,
            kwargs=dict(beta=0.5, **mode_kwargs(topk, "tail")))
    student3, teacher3 = randn((2, 3, 4, TP_VOCAB), 430), randn((2, 3, 4, TP_VOCAB), 431)
    cases["3d chunk_size=5"] = dict(kind="div", student=student3, teacher=teacher3,
                                    mask=random_mask((2, 3, 4), 432), weights=randn((2, 3, 4), 433, 1.0),
                                    kwargs=dict(beta=0.9, temperature=2.0, chunk_size=5))
    for offset in (0.0, 1e4):
        student, teacher = extreme_logits(shape, TP_VOCAB, 440, offset)
        for beta in (0.0, 0.5, 1.0):
            for topk, normalize in ((None, "renorm"), (8, "tail")):
                cases[f"extreme offset={offset} beta={beta} topk={topk}"] = dict(
                    kind="div", student=student, teacher=teacher, mask=mask, weights=weights,
                    kwargs=dict(beta=beta, temperature=0.5, **mode_kwargs(topk, normalize)))
    for normalize in ("renorm", "full", "tail"):
        for topk_ids in (True, False):
            student, _, teacher_logp, ids = sparse_inputs(shape, TP_VOCAB, 450, 2.0, 8, topk_ids)
            cases[f"sparse {normalize} topk_ids={topk_ids}"] = dict(
                kind="sparse", student=student, teacher_logp=teacher_logp, ids=ids, mask=mask, weights=weights,
                kwargs=dict(beta=0.5, temperature=2.0, normalize=normalize))
    return cases


def tp_rank_body(tp: int, cases: dict) -> dict:
    """Rank body: evaluates every case on this rank's vocab shard."""
    rank = tp_rank(tp)
    results = {}
    for name, case in cases.items():
        kind = case["kind"]
        if kind == "div":
            call = dense_call(shard(case["teacher"], tp, rank), case["mask"], **case["kwargs"])
            results[name] = evaluate(call, shard(case["student"], tp, rank), case["weights"])
        elif kind == "sparse":
            call = sparse_call(case["teacher_logp"], case["ids"], case["mask"], **case["kwargs"])
            results[name] = evaluate(call, shard(case["student"], tp, rank), case["weights"])
    return results


@functools.cache
def tp_results(tp: int) -> list[dict]:
    return run_distributed(tp_rank_body, tp, tp, tp_cases(), timeout=300.0)


@functools.cache
def tp1_results() -> dict:
    """The implementation in this process (no TP) on the same cases."""
    results = {}
    for name, case in tp_cases().items():
        if case["kind"] == "div":
            call = dense_call(case["teacher"], case["mask"], **case["kwargs"])
            results[name] = evaluate(call, case["student"], case["weights"])
        elif case["kind"] == "sparse":
            call = sparse_call(case["teacher_logp"], case["ids"], case["mask"], **case["kwargs"])
            results[name] = evaluate(call, case["student"], case["weights"])
    return results


def merged(per_rank: list[dict], name: str) -> dict:
    """Rank 0's values (after checking all ranks agree) and the re-assembled gradients."""
    first = per_rank[0][name]
    out = dict(first)
    for key in ("none", "sum", "mean"):
        assert torch.isfinite(first[key]).all(), f"{name} [{key}]: non-finite values on rank 0"
        for rank, result in enumerate(per_rank[1:], start=1):
            assert_close(result[name][key], first[key], 1e-6, f"{name} [{key}] rank {rank} vs rank 0")
    for key in ("grad_mean", "grad_none"):
        out[key] = torch.cat([result[name][key] for result in per_rank], dim=-1)
    return out


def expected(case: dict) -> dict:
    if case["kind"] == "div":
        return dense_reference(case["student"], case["teacher"], case["mask"], case["weights"], **case["kwargs"])
    return sparse_reference(case["student"], case["teacher_logp"], case["ids"], case["mask"], case["weights"],
                            **case["kwargs"])


DIVERGENCE_CASES = [name for name, case in tp_cases().items()
                    if case["kind"] in ("div", "sparse") and not name.startswith("extreme")]
EXTREME_CASES = [name for name in tp_cases() if name.startswith("extreme")]


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_reference_and_tp1(tp):
    check_tp_cases(tp, DIVERGENCE_CASES)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_huge_and_infinite_logits(tp):
    check_tp_cases(tp, EXTREME_CASES)


def check_tp_cases(tp: int, names: list[str]) -> None:
    per_rank = tp_results(tp)
    failures = []
    for name in names:
        case = tp_cases()[name]
        try:
            got = merged(per_rank, name)
            want = expected(case)
            temperature = case["kwargs"].get("temperature", 1.0)
            compare(got, want, f"TP={tp} {name}", temperature)
            # Same implementation without TP: catches a factor-of-tp gradient or a lost
            # softmax term on ranks that do not own a token.
            compare(got, tp1_results()[name], f"TP={tp} vs TP=1 {name}", temperature, PARITY_RTOL, PARITY_RTOL,
                    scales=want)
            if not case["mask"].any():
                assert (got["mean"] == 0).all() and (got["grad_mean"] == 0).all(), f"{name}: all-masked"
            vocab_size = case["kwargs"].get("vocab_size")
            if vocab_size is not None:
                assert (got["grad_mean"][..., vocab_size:] == 0).all(), f"{name}: padding got a gradient"
        except AssertionError as error:
            failures.append(str(error).splitlines()[0])
    assert not failures, f"{len(failures)} of {len(names)} cases fail:\n" + "\n".join(failures)
