"""The fused LM-head ops (what the trainer runs) on bf16 hidden states and heads, against float64.

A bf16 run hands the kernels bf16 hidden states `[N, H]` and bf16 LM-head shards; the
logits chunk `hidden @ head.T` is bf16 (as Megatron's own output layer), and every softmax
statistic, log-probability and divergence after it must be fp32. To test exactly that
part, the inputs are built so that the bf16 logits are exact (`exact_bf16_inputs`):
hidden values in {0, +-1/2, +-1}, head values in {0, +-1/4, +-1/2} (times a power of
two): every logit is a multiple of 1/8 below 2^5 (times the power), which bf16's 8
significant bits and an fp32 accumulation hold exactly. The float64 reference on those
logits then differs from the kernels only by the kernels' own arithmetic, so the fp32
tolerances of `test_ops_divergence` apply (1e-5 relative, 2e-6 absolute per token).
Statistics taken in bf16 err by ~2^-8 relative (measured: 1e-2 on these values).

Gradients come back in bf16 (the dtype of the hidden states and head): one bf16 rounding,
2^-9 relative, on top of fp32 math: tolerance 2^-8 of the tensor's largest gradient (plus
1e-6 where the exact gradient is 0).

Dense bf16 logits (non-negativity, identical models, gradients) are tested in
`test_ops_divergence.py`; here also -inf logits and padded head rows in bf16.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.ops import (
    fused_linear_divergence,
    fused_linear_token_logprobs,
    fused_linear_topk_logprobs,
    vocab_parallel_divergence,
)
from megatron_opd.testing import run_distributed
from tests import divergence_reference as ref
from tests.ops_helpers import assert_close, tp_rank

VALUE_RTOL = 1e-5  # fp32 arithmetic on exact inputs (see the module docstring)
VALUE_ATOL = 2e-6
GRAD_RTOL = 2.0 ** -8  # one bf16 rounding of the returned gradient on top of fp32 math
GRAD_ATOL = 1e-6  # where the exact gradient is ~0 (identical models): fp32 rounding, measured 3e-8

N, HIDDEN, VOCAB, TRUE_VOCAB = 48, 64, 96, 90  # head rows >= TRUE_VOCAB are padding
BETAS = (0.0, 0.5, 1.0)
MODES = ((None, "renorm"), (8, "renorm"), (8, "tail"))  # true divergences: never negative
PAD_LOGIT_ROW = 2.0 ** 13  # a padded head row of huge (exact) values: counted, it would dominate


def _draw(shape, generator, values) -> torch.Tensor:
    choice = torch.randint(0, len(values), shape, generator=generator)
    return torch.tensor(values, dtype=torch.float64)[choice]


def exact_bf16_inputs(seed: int, near: str = "", scale: float = 1.0) -> dict:
    """Student and teacher hidden states `[N, H]` and heads `[VOCAB, H]` whose logits are exact in
    bf16 (see the module docstring), as float64 tensors holding bf16 values; the padded head rows
    hold PAD_LOGIT_ROW. `near="near"`: the teacher is the student with 1 in 16 head entries moved
    by 1/4 toward the middle (small divergences, where rounding could go negative); "same": the
    teacher is the student (D = 0 exactly; fp32 rounding alone gives about -1e-8). `scale` (a power of two) scales
    both heads: logits up to 2^5 * scale."""
    generator = torch.Generator().manual_seed(seed)
    hidden = _draw((N, HIDDEN), generator, (-1.0, -0.5, 0.0, 0.5, 1.0))
    head = _draw((VOCAB, HIDDEN), generator, (-0.5, -0.25, 0.0, 0.25, 0.5)) * scale
    if near:
        moved = torch.rand(VOCAB, HIDDEN, generator=generator) < (1 / 16 if near == "near" else 0.0)
        step = torch.where(head > 0, -0.25, 0.25) * scale  # stays within [-1/2, 1/2] * scale
        teacher_hidden, teacher_head = hidden.clone(), head + moved * step
    else:
        teacher_hidden = _draw((N, HIDDEN), generator, (-1.0, -0.5, 0.0, 0.5, 1.0))
        teacher_head = _draw((VOCAB, HIDDEN), generator, (-0.5, -0.25, 0.0, 0.25, 0.5)) * scale
    for weight in (head, teacher_head):
        weight[TRUE_VOCAB:] = PAD_LOGIT_ROW
    mask = torch.rand(N, generator=generator) > 0.25
    inputs = {"hidden": hidden, "head": head, "teacher_hidden": teacher_hidden, "teacher_head": teacher_head,
              "mask": mask}
    for name, tensor in inputs.items():
        if tensor.is_floating_point():
            assert torch.equal(tensor.bfloat16().double(), tensor), f"{name} is not bf16-exact"
    for logits in (hidden @ head.T, teacher_hidden @ teacher_head.T):
        assert torch.equal(logits.bfloat16().double(), logits), "logits are not bf16-exact"
    return inputs


def without_boundary_ties(inputs: dict, topk) -> dict:
    """For top-K: the mask without tokens whose teacher's K-th and (K+1)-th logits tie (exact
    logits often do; which tied id is taken is arbitrary, and the reference may take the other)."""
    if topk is None:
        return inputs
    logits = (inputs["teacher_hidden"] @ inputs["teacher_head"].T)[:, :TRUE_VOCAB]
    return {**inputs, "mask": inputs["mask"] & no_boundary_tie(logits, topk)}


def no_boundary_tie(teacher_logits: torch.Tensor, topk: int) -> torch.Tensor:
    """`[...]` True where the K-th and (K+1)-th largest of `teacher_logits` `[..., V]` differ."""
    values = teacher_logits.double().topk(topk + 1, dim=-1).values
    untied = values[..., -2] != values[..., -1]
    assert untied.sum() >= untied.numel() // 4, "too few tokens without a tie at the top-K boundary"
    return untied


def reference(inputs: dict, beta: float, temperature: float, topk, normalize: str, tp: int = 1):
    """Per-token float64 divergence over the true vocab and its gradients (sum over counted tokens).
    The hidden-state gradient is given per head shard `[tp, N, H]`: what each TP rank computes."""
    hiddens = [inputs["hidden"].clone().requires_grad_(True) for _ in range(tp)]
    head = inputs["head"].clone().requires_grad_(True)
    logits = torch.cat([hidden @ part.T for hidden, part in zip(hiddens, head.chunk(tp))], dim=-1)
    teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_head"].T
    per_token = ref.dense_divergence(logits, teacher_logits, beta=beta, temperature=temperature,
                                     topk=topk, normalize=normalize, vocab_size=TRUE_VOCAB)
    ref.reduce(per_token, inputs["mask"], "sum").backward()
    grad_hidden = torch.stack([hidden.grad for hidden in hiddens])
    return ref.reduce(per_token.detach(), inputs["mask"], "none"), grad_hidden.squeeze(0), head.grad


def fused_bf16(inputs: dict, beta: float, temperature: float, topk, normalize: str, rank: int = 0, tp: int = 1):
    """The kernel on bf16 tensors (this rank's head shard): per-token values, gradients of their sum."""
    def shard_of(weight):
        return weight.chunk(tp)[rank].bfloat16()

    hidden = inputs["hidden"].bfloat16().requires_grad_(True)
    head = shard_of(inputs["head"]).requires_grad_(True)
    kwargs = dict(beta=beta, temperature=temperature, topk=topk, topk_normalize=normalize, vocab_size=TRUE_VOCAB,
                  mask=inputs["mask"], chunk_size=16)
    per_token = fused_linear_divergence(hidden, head, inputs["teacher_hidden"].bfloat16(),
                                        shard_of(inputs["teacher_head"]), reduction="none", **kwargs)
    total = fused_linear_divergence(hidden, head, inputs["teacher_hidden"].bfloat16(),
                                    shard_of(inputs["teacher_head"]), reduction="sum", **kwargs)
    total.backward()
    return per_token.detach(), hidden.grad, head.grad


def check_case(got, want, what: str) -> None:
    """Values >= 0 and close; gradients close; nothing NaN; padded head rows get no gradient."""
    (values, grad_hidden, grad_head), (want_values, want_hidden, want_head) = got, want
    assert values.dtype == torch.float32, f"{what}: divergence dtype {values.dtype}"
    assert grad_hidden.dtype == grad_head.dtype == torch.bfloat16, f"{what}: gradient dtypes"
    assert (values >= 0).all(), f"{what}: negative divergence {values.min().item():.3g}"
    assert_close(values, want_values, VALUE_RTOL, f"{what} [value]", VALUE_ATOL)
    assert_close(grad_hidden, want_hidden, GRAD_RTOL, f"{what} [grad hidden]", GRAD_ATOL)
    assert_close(grad_head, want_head, GRAD_RTOL, f"{what} [grad head]", GRAD_ATOL)
    assert (grad_head[TRUE_VOCAB:] == 0).all(), f"{what}: padded head rows got a gradient"


@pytest.mark.parametrize("topk,normalize", MODES, ids=[f"top{k}-{n}" if k else "full_vocab" for k, n in MODES])
@pytest.mark.parametrize("pair", ["far", "near", "same", "huge"])
def test_fused_bf16_matches_float64(pair, topk, normalize):
    """bf16 hidden states and heads, exact logits: fp32-level agreement with float64, >= 0,
    padded head rows (huge values) excluded. `huge`: logits up to 2^11, temperature 0.5."""
    near = pair if pair in ("near", "same") else ""
    inputs = without_boundary_ties(exact_bf16_inputs(seed=5, near=near, scale=64.0 if pair == "huge" else 1.0), topk)
    temperature = 0.5 if pair == "huge" else 2.0
    failures = []
    for beta in BETAS:
        what = f"{pair} beta={beta} topk={topk} {normalize}"
        got = fused_bf16(inputs, beta, temperature, topk, normalize)
        try:
            check_case(got, reference(inputs, beta, temperature, topk, normalize), what)
        except AssertionError as error:
            failures.append(str(error).splitlines()[0])
    assert not failures, "\n".join(failures)


def _tp_body(tp: int) -> list:
    rank = tp_rank(tp)
    inputs = exact_bf16_inputs(seed=6)
    return [fused_bf16(without_boundary_ties(inputs, topk), beta, 1.0, topk, normalize, rank, tp)
            for beta in BETAS for topk, normalize in MODES]


def test_fused_bf16_at_tp2_matches_float64():
    """TP=2 (rank 1's shard holds the padded rows): each rank's value and its shard's gradients."""
    per_rank = run_distributed(_tp_body, 2, 2, timeout=300.0)
    inputs = exact_bf16_inputs(seed=6)
    cases = [(beta, topk, normalize) for beta in BETAS for topk, normalize in MODES]
    for index, (beta, topk, normalize) in enumerate(cases):
        want_values, want_hidden, want_head = reference(without_boundary_ties(inputs, topk), beta, 1.0, topk,
                                                        normalize, tp=2)
        grad_head = torch.cat([rank[index][2] for rank in per_rank])
        for rank, result in enumerate(per_rank):
            values, grad_hidden, _ = result[index]
            check_case((values, grad_hidden, grad_head), (want_values, want_hidden[rank], want_head),
                       f"TP=2 rank {rank} beta={beta} topk={topk} {normalize}")


def test_fused_bf16_token_logprobs_and_topk():
    """The CE / OPD-RL log-probs and a teacher's top-k answer (server, cache) on bf16 inputs:
    fp32 values within fp32 error of float64 log-softmax over the true vocab."""
    inputs = exact_bf16_inputs(seed=7)
    hidden, head = inputs["hidden"], inputs["head"]
    want = torch.log_softmax((hidden @ head.T)[:, :TRUE_VOCAB] / 0.5, dim=-1)
    ids = torch.randint(0, TRUE_VOCAB, (N,), generator=torch.Generator().manual_seed(8))
    bf16_hidden = hidden.bfloat16().requires_grad_(True)
    bf16_head = head.bfloat16().requires_grad_(True)
    logp = fused_linear_token_logprobs(bf16_hidden, bf16_head, ids, temperature=0.5, vocab_size=TRUE_VOCAB,
                                       chunk_size=16)
    assert logp.dtype == torch.float32
    assert_close(logp, want.gather(-1, ids[:, None]).squeeze(-1), VALUE_RTOL, "token log-probs", VALUE_ATOL)
    logp.sum().backward()
    hidden64, head64 = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    torch.log_softmax((hidden64 @ head64.T)[:, :TRUE_VOCAB] / 0.5, -1).gather(-1, ids[:, None]).sum().backward()
    assert_close(bf16_hidden.grad, hidden64.grad, GRAD_RTOL, "token log-probs [grad hidden]")
    assert_close(bf16_head.grad, head64.grad, GRAD_RTOL, "token log-probs [grad head]")

    top_logp, top_ids, token_logp = fused_linear_topk_logprobs(
        hidden.bfloat16(), head.bfloat16(), 8, token_ids=ids, temperature=0.5, vocab_size=TRUE_VOCAB, chunk_size=16)
    assert top_logp.dtype == token_logp.dtype == torch.float32 and (top_ids < TRUE_VOCAB).all()
    # Exact logits tie often: compare the values, and each returned id's own log-prob.
    assert_close(top_logp, want.topk(8, dim=-1).values, VALUE_RTOL, "top-k log-probs", VALUE_ATOL)
    assert_close(top_logp, want.gather(-1, top_ids), VALUE_RTOL, "top-k ids' log-probs", VALUE_ATOL)
    assert_close(token_logp, want.gather(-1, ids[:, None]).squeeze(-1), VALUE_RTOL, "top-k token log-probs",
                 VALUE_ATOL)


def test_bf16_infinite_logits_give_no_nan():
    """Dense bf16 logits with -inf at the same ids in both models and -inf in the padded columns
    (a masked vocab): finite values and gradients, close to float64, no gradient at -inf."""
    generator = torch.Generator().manual_seed(9)
    student = (torch.randn(6, 8, 64, generator=generator) * 3).bfloat16()
    teacher = (torch.randn(6, 8, 64, generator=generator) * 3).bfloat16()
    dead = torch.rand(6, 8, 64, generator=generator).argsort(-1)[..., :5]
    for logits in (student, teacher):
        logits.scatter_(-1, dead, float("-inf"))
        logits[..., 60:] = float("-inf")
    base_mask = torch.rand(6, 8, generator=generator) > 0.2
    for beta in BETAS:
        for topk, normalize in MODES:
            what = f"-inf beta={beta} topk={topk} {normalize}"
            mask = base_mask if topk is None else base_mask & no_boundary_tie(teacher[..., :60], topk)
            leaf = student.clone().requires_grad_(True)
            kwargs = dict(beta=beta, topk=topk, topk_normalize=normalize, vocab_size=60, mask=mask)
            values = vocab_parallel_divergence(leaf, teacher, reduction="none", **kwargs)
            vocab_parallel_divergence(leaf, teacher, reduction="sum", **kwargs).backward()
            assert torch.isfinite(values).all() and torch.isfinite(leaf.grad).all(), f"{what}: non-finite"
            assert (values >= 0).all(), f"{what}: negative divergence {values.min().item():.3g}"
            want = ref.reduce(ref.dense_divergence(student.double(), teacher.double(), beta=beta, topk=topk,
                                                   normalize=normalize, vocab_size=60), mask, "none")
            assert_close(values, want, VALUE_RTOL, what, VALUE_ATOL)
            assert (leaf.grad[torch.isinf(student)] == 0).all(), f"{what}: -inf logits got a gradient"
