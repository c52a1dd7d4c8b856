"""fused_linear_divergence / fused_linear_sparse_divergence equal the unfused divergences on
h @ W.T, and never hold [N, V/tp].

(The fused token log-probs and top-k are tested in test_ops_token_logprobs.py and test_ops_topk.py.)

Reference: `vocab_parallel_divergence` on logits materialized by an ordinary matmul,
with autograd carrying its gradient back to the hidden states and the LM head.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_opd.ops import (
    fused_linear_divergence,
    fused_linear_sparse_divergence,
    fused_linear_topk_logprobs,
    sparse_teacher_divergence,
    vocab_parallel_divergence,
)
from megatron_opd.testing import run_distributed
from tests.ops_helpers import tp_rank

N, H_STUDENT, H_TEACHER, VOCAB = 64, 8, 12, 40
CASES = [(beta, topk, norm) for beta in (0.0, 0.5, 1.0)
         for topk, norm in ((None, "renorm"), (6, "renorm"), (6, "full"), (6, "tail"))]


def tensors(dtype=torch.float64):
    generator = torch.Generator().manual_seed(3)
    draw = lambda *shape, std=1.0: torch.randn(*shape, generator=generator, dtype=dtype) * std  # noqa: E731
    mask = torch.rand(N, generator=generator) > 0.25
    return (draw(N, H_STUDENT), draw(VOCAB, H_STUDENT, std=0.8),
            draw(N, H_TEACHER), draw(VOCAB, H_TEACHER, std=0.8), mask)


def both_paths(tp: int, dtype=torch.float64) -> list:
    """Per case on this rank: (fused value, unfused value, fused grads, unfused grads)."""
    rank = tp_rank(tp)
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = tensors(dtype)
    student_weight = student_weight.chunk(tp)[rank]
    teacher_weight = teacher_weight.chunk(tp)[rank]
    results = []
    for beta, topk, norm in CASES:
        kwargs = dict(beta=beta, temperature=1.3, topk=topk, topk_normalize=norm, vocab_size=VOCAB - 3,
                      mask=mask, chunk_size=5)
        leaves = [student_hidden.clone().requires_grad_(), student_weight.clone().requires_grad_()]
        fused = fused_linear_divergence(leaves[0], leaves[1], teacher_hidden, teacher_weight, **kwargs)
        fused.backward()
        dense = [student_hidden.clone().requires_grad_(), student_weight.clone().requires_grad_()]
        unfused = vocab_parallel_divergence(dense[0] @ dense[1].T, teacher_hidden @ teacher_weight.T, **kwargs)
        unfused.backward()
        results.append((fused.detach(), unfused.detach(), [t.grad for t in leaves], [t.grad for t in dense]))
    return results


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_equals_unfused(tp):
    ranks = [both_paths(1)] if tp == 1 else run_distributed(both_paths, tp, tp)
    for index, case in enumerate(CASES):
        values = [rank[index][0] for rank in ranks] + [rank[index][1] for rank in ranks]
        assert all(torch.allclose(v, values[0], rtol=1e-10, atol=1e-12) for v in values), case
        # Hidden-state gradients are complete on every rank; weight gradients are per shard.
        for rank in ranks:
            fused_grads, unfused_grads = rank[index][2], rank[index][3]
            for fused_grad, unfused_grad in zip(fused_grads, unfused_grads):
                assert torch.allclose(fused_grad, unfused_grad, rtol=1e-9, atol=1e-11), case


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("topk", [None, 6])
def test_fused_never_materializes_all_logits(topk):
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = tensors(torch.float32)
    student_hidden.requires_grad_()
    student_weight.requires_grad_()
    with _LargestAllocation() as tracker:
        loss = fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                       beta=0.5, topk=topk, topk_normalize="tail", mask=mask, chunk_size=4)
        loss.backward()
    # Chunks of 4 rows: nothing near [N, V]; the largest legitimate tensors are the
    # [N, H] hidden states and gradients, [V, H] heads and [4, V] logit chunks.
    assert tracker.largest <= max(N * H_TEACHER, VOCAB * H_TEACHER, 4 * VOCAB)
    assert tracker.largest < N * VOCAB / 2


def sparse_paths_on_rank(tp: int) -> list:
    """Per normalization: the fused sparse divergence and its grads, the unfused one on
    materialized logits and its grads, and (renorm) the local top-K path's value."""
    rank = tp_rank(tp)
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = tensors()
    student_weight, teacher_weight = student_weight.chunk(tp)[rank], teacher_weight.chunk(tp)[rank]
    # What a server returns: the teacher's top-6 full-vocab log-probs at temperature 1.
    teacher_logprobs, teacher_ids, _ = fused_linear_topk_logprobs(teacher_hidden, teacher_weight, 6,
                                                                  vocab_size=VOCAB - 3)
    results = []
    for normalize in ("renorm", "full", "tail"):
        kwargs = dict(beta=0.3, temperature=1.0, normalize=normalize, vocab_size=VOCAB - 3, mask=mask, chunk_size=5)
        leaves = [student_hidden.clone().requires_grad_(), student_weight.clone().requires_grad_()]
        fused = fused_linear_sparse_divergence(leaves[0], leaves[1], teacher_logprobs, teacher_ids, **kwargs)
        fused.backward()
        dense = [student_hidden.clone().requires_grad_(), student_weight.clone().requires_grad_()]
        unfused = sparse_teacher_divergence(dense[0] @ dense[1].T, teacher_logprobs, teacher_ids, **kwargs)
        unfused.backward()
        results.append((fused.detach(), unfused.detach(), [t.grad for t in leaves], [t.grad for t in dense]))
    # renorm at tau != 1 from temperature-1 log-probs (logprobs / tau) is the local top-K path exactly
    server_style = fused_linear_sparse_divergence(student_hidden, student_weight, teacher_logprobs / 1.3, teacher_ids,
                                                  beta=0.3, temperature=1.3, vocab_size=VOCAB - 3, mask=mask)
    local = fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, beta=0.3,
                                    temperature=1.3, topk=6, vocab_size=VOCAB - 3, mask=mask)
    return results, server_style, local


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_sparse_equals_unfused_and_the_local_topk_path(tp):
    ranks = [sparse_paths_on_rank(1)] if tp == 1 else run_distributed(sparse_paths_on_rank, tp, tp)
    for results, server_style, local in ranks:
        for fused, unfused, fused_grads, unfused_grads in results:
            torch.testing.assert_close(fused, unfused, rtol=1e-9, atol=1e-12)
            for got, expected in zip(fused_grads, unfused_grads):
                torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(server_style, local, rtol=1e-6, atol=1e-9)  # fp32 log-probs, as served
    assert ranks[0][0][0][0] > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_kl_gradient_from_the_forward_pass(dtype):
    """Forward KL without TP computes the head's gradient during the forward pass (as Liger does) and the
    backward only scales it when every token has the same upstream gradient ("mean", "sum"); other
    upstream gradients ("none" with weights) and a second backward recompute it. All three against
    float64 autograd through h @ W.T and the dense formula (tests/divergence_reference.py)."""
    from tests import divergence_reference as ref

    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = tensors(dtype)
    weights = torch.rand(N, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * mask
    kwargs = dict(beta=0.0, temperature=1.3, vocab_size=VOCAB - 3)
    tolerance = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)

    def reference(weighting):
        leaves = [student_hidden.double().clone().requires_grad_(), student_weight.double().clone().requires_grad_()]
        per_token = ref.dense_divergence(leaves[0] @ leaves[1].T, teacher_hidden.double() @ teacher_weight.double().T,
                                         **kwargs)
        (per_token * weighting).sum().backward()
        return [leaf.grad for leaf in leaves]

    for reduction, weighting in (("mean", mask.double() / mask.sum()), ("sum", mask.double()), ("none", weights)):
        leaves = [student_hidden.clone().requires_grad_(), student_weight.clone().requires_grad_()]
        loss = fused_linear_divergence(*leaves, teacher_hidden, teacher_weight, mask=mask, reduction=reduction,
                                       chunk_size=5, **kwargs)
        loss = (loss.double() * weights).sum() if reduction == "none" else loss
        loss.backward(retain_graph=True)
        first = [leaf.grad.clone() for leaf in leaves]
        for leaf in leaves:
            leaf.grad = None
        loss.backward()  # the unit gradients were consumed: this one recomputes
        for got, again, want in zip(first, [leaf.grad for leaf in leaves], reference(weighting)):
            assert torch.allclose(got.double(), want, **tolerance), (reduction, (got.double() - want).abs().max())
            assert torch.allclose(again.double(), want, **tolerance), (reduction, "second backward")
