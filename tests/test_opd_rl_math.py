"""OPD-RL's advantage and loss math against hand-written float64 references on small tensors.

The references are written out token by token in plain Python (`statistics`, `math`),
independently of the vectorized code under test.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megatron_opd.algorithms.opd_rl import (
    GROUP_STD_EPSILON,
    OPDRLLoss,
    RolloutTokens,
    clipped_policy_loss,
    group_advantages,
    teacher_kl_k3,
    token_advantages,
)


def reference_group_advantages(rewards: list[float], group: int) -> list[float]:
    out = []
    for start in range(0, len(rewards), group):
        values = rewards[start:start + group]
        mean, std = statistics.mean(values), statistics.stdev(values)
        out += [(value - mean) / (std + GROUP_STD_EPSILON) for value in values]
    return out


def reference_surrogate(logp: float, old: float, advantage: float, eps: float, eps_high: float) -> tuple:
    """(loss, d loss / d logp, clipped low, clipped high) of one token."""
    ratio = math.exp(logp - old)
    unclipped = ratio * advantage
    clipped = min(max(ratio, 1 - eps), 1 + eps_high) * advantage
    if unclipped <= clipped:  # the min picks the unclipped term: gradient -ratio * A
        loss, grad = -unclipped, -ratio * advantage
    else:  # the clipped term is constant in logp
        loss, grad = -clipped, 0.0
    return loss, grad, ratio < 1 - eps and advantage < 0, ratio > 1 + eps_high and advantage > 0


def test_group_advantages_match_reference_and_equal_groups_give_zero():
    rewards = [1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, 3.0, -1.0, 4.0, 0.0, 0.25]
    actual = group_advantages(torch.tensor(rewards), 4)
    expected = reference_group_advantages(rewards, 4)
    assert actual.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert actual[4:8].tolist() == [0.0] * 4, "a group of equal rewards has no preference"
    with pytest.raises(ValueError, match="num_generations=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(torch.zeros(6), 1)


def test_token_advantages_add_the_detached_teacher_log_ratio():
    base = torch.tensor([0.5, 0.5, -1.0], dtype=torch.float64)
    teacher = torch.tensor([-1.0, -0.2, -3.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-0.5, -0.7, -0.1], dtype=torch.float64, requires_grad=True)
    actual = token_advantages(base, teacher, old, teacher_kl_coef=0.3)
    expected = [b + 0.3 * (t - o) for b, t, o in zip(base.tolist(), teacher.tolist(), old.tolist())]
    assert actual.tolist() == pytest.approx(expected, rel=1e-6)
    assert not actual.requires_grad
    assert token_advantages(base, teacher, old, teacher_kl_coef=0.0).tolist() == base.tolist()
    assert token_advantages(base, None, old, teacher_kl_coef=1.0).tolist() == base.tolist()
    clipped = token_advantages(base, teacher, old, teacher_kl_coef=1.0, opsd_clip=0.5)
    assert clipped.tolist() == pytest.approx([0.0, 1.0, -1.5], rel=1e-6)


def test_teacher_kl_k3_matches_the_formula():
    teacher = torch.tensor([-1.0, -0.2, -3.0, -0.5])
    student = torch.tensor([-0.5, -0.7, -0.1, -0.5])
    expected = [math.exp(t - s) - (t - s) - 1 for t, s in zip(teacher.tolist(), student.tolist())]
    actual = teacher_kl_k3(teacher, student)
    assert actual.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert actual[3] == 0


def test_teacher_kl_k3_mean_over_student_samples_is_the_exact_kl():
    """k3 on tokens sampled from the student estimates KL(student || teacher) without bias:
    its mean over 400k draws of a known 6-outcome pair equals the exact KL (float64, written
    out), within 5 standard errors; the teacher's direction, KL(teacher || student), differs."""
    student = [0.40, 0.25, 0.15, 0.10, 0.06, 0.04]
    teacher = [0.10, 0.30, 0.05, 0.35, 0.15, 0.05]
    exact = sum(s * math.log(s / t) for s, t in zip(student, teacher))
    reverse = sum(t * math.log(t / s) for s, t in zip(student, teacher))
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(torch.tensor(student, dtype=torch.float64), 400_000, replacement=True,
                              generator=generator)
    log_student = torch.tensor([math.log(p) for p in student], dtype=torch.float64)[draws]
    log_teacher = torch.tensor([math.log(p) for p in teacher], dtype=torch.float64)[draws]
    k3 = teacher_kl_k3(log_teacher, log_student).double()
    standard_error = k3.std().item() / math.sqrt(len(k3))
    assert abs(k3.mean().item() - exact) < 5 * standard_error, (k3.mean().item(), exact, standard_error)
    assert abs(reverse - exact) > 50 * standard_error, "the two directions must be told apart"


def test_clipped_surrogate_at_both_bounds_matches_reference():
    eps, eps_high = 0.2, 0.28
    old = [-1.0] * 8
    # ratios 0.5 (below 1 - eps), 1.0, 1.5 (above 1 + eps_high), 1.1, with advantages of both signs
    logp = [-1.0 + math.log(r) for r in (0.5, 0.5, 1.5, 1.5, 1.0, 1.1, 1.1, 0.9)]
    advantages = [-1.0, 2.0, 1.5, -0.5, 0.7, -0.3, 0.0, 1.0]
    logp_tensor = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    per_token, metrics = clipped_policy_loss(logp_tensor, torch.tensor(old, dtype=torch.float64),
                                             torch.tensor(advantages, dtype=torch.float64), eps, eps_high)
    per_token.sum().backward()
    reference = [reference_surrogate(*args, eps, eps_high) for args in zip(logp, old, advantages)]
    assert per_token.tolist() == pytest.approx([r[0] for r in reference], rel=1e-9, abs=1e-12)
    assert logp_tensor.grad.tolist() == pytest.approx([r[1] for r in reference], rel=1e-9, abs=1e-12)
    assert metrics["clip_low_sum"] == sum(r[2] for r in reference) == 1
    assert metrics["clip_high_sum"] == sum(r[3] for r in reference) == 1
    assert logp_tensor.grad[0] == 0 and logp_tensor.grad[2] == 0, "clipped tokens pass no gradient"
    assert logp_tensor.grad[1] != 0 and logp_tensor.grad[3] != 0, "the other side of each bound is not clipped"


def dense_reference(hidden, head, labels, mask, base, teacher_logprobs, old_logprobs, coef, temperature, eps,
                    eps_high, vocab):
    """Float64 loss and gradients from full logits, per token in Python."""
    hidden = hidden.double().detach().requires_grad_(True)
    head_ref = head.double().detach().requires_grad_(True)
    logits = (hidden @ head_ref.T)[..., :vocab] / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    flat = [(b, s) for b in range(mask.shape[0]) for s in range(mask.shape[1]) if mask[b, s]]
    loss = 0.0
    for n, (b, s) in enumerate(flat):
        logp = logp_all[b, s, labels[b, s]]
        old = old_logprobs[n].item() if old_logprobs is not None else logp.item()
        advantage = base[n].item() + (coef * (teacher_logprobs[n].item() - old) if teacher_logprobs is not None else 0)
        ratio = torch.exp(logp - old)
        loss = loss - torch.minimum(ratio * advantage, ratio.clamp(1 - eps, 1 + eps_high) * advantage)
    loss.backward()
    return loss.item(), hidden.grad, head_ref.grad


def random_rollout_case(seed: int, vocab: int, with_old: bool) -> tuple:
    """hidden [2, 5, 8], head [16, 8] (vocab padded to 16), labels and mask [2, 5] (6 counted
    tokens), per-token base advantages, teacher log-probs and (`with_old`) stored old ones [6]."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 5, 8, generator=generator)
    head = torch.randn(16, 8, generator=generator)
    labels = torch.randint(0, vocab, (2, 5), generator=generator)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    tokens = int(mask.sum())
    base = torch.tensor([0.8] * 3 + [-1.1] * 3)
    teacher_logprobs = -torch.rand(tokens, generator=generator) * 3
    old = (-torch.rand(tokens, generator=generator) * 3) if with_old else None
    return hidden, head, labels, mask, base, teacher_logprobs, old


@pytest.mark.parametrize("with_old", [False, True], ids=["num_iterations_1", "stored_old"])
@pytest.mark.parametrize("coef", [0.0, 0.7], ids=["plain_grpo", "opd"])
def test_loss_and_gradients_match_dense_reference(with_old, coef):
    vocab = 11
    hidden, head, labels, mask, base, teacher_logprobs, old = random_rollout_case(0, vocab, with_old)
    tokens = int(mask.sum())
    loss_fn = OPDRLLoss(epsilon=0.2, epsilon_high=0.3, teacher_kl_coef=coef, temperature=0.8, vocab_size=vocab)
    hidden_t = hidden.clone().double().requires_grad_(True)
    head_t = head.clone().double().requires_grad_(True)
    loss, count, metrics = loss_fn(hidden_t, head_t, labels, mask, RolloutTokens(base, teacher_logprobs, old))
    loss.backward()
    expected, grad_hidden, grad_head = dense_reference(hidden, head, labels, mask, base, teacher_logprobs, old,
                                                       coef, 0.8, 0.2, 0.3, vocab)
    assert int(count) == tokens
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(hidden_t.grad, grad_hidden, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(head_t.grad, grad_head, rtol=1e-6, atol=1e-9)
    # teacher_kl: k3 of the teacher against the sampling student (the stored old, else the current)
    logp_all = torch.log_softmax((hidden.double() @ head.double().T)[..., :vocab] / 0.8, dim=-1)
    current = [logp_all[b, s, labels[b, s]].item() for b in range(mask.shape[0]) for s in range(mask.shape[1])
               if mask[b, s]]
    sampler = old.tolist() if with_old else current
    expected_kl = sum(math.exp(t - o) - (t - o) - 1 for t, o in zip(teacher_logprobs.tolist(), sampler))
    assert metrics["teacher_kl_sum"].item() == pytest.approx(expected_kl, rel=1e-5)
    if with_old:
        assert metrics["clip_low_sum"] + metrics["clip_high_sum"] > 0, "the stored old log-probs should clip some"


@pytest.mark.parametrize("with_old", [False, True], ids=["num_iterations_1", "stored_old"])
def test_truncated_importance_sampling_matches_dense_reference(with_old):
    """rollout_importance_sampling_cap: each token's surrogate times min(p_old / p_rollout, cap),
    a constant weight (no gradient through it); float64, per token in Python."""
    vocab, cap = 11, 1.5
    hidden, head, labels, mask, base, teacher_logprobs, old = random_rollout_case(1, vocab, with_old)
    logp_all = torch.log_softmax((hidden.double() @ head.double().T)[..., :vocab] / 0.8, dim=-1)
    flat = [(b, s) for b in range(2) for s in range(5) if mask[b, s]]
    current = [logp_all[b, s, labels[b, s]].item() for b, s in flat]
    sampler = old.tolist() if with_old else current
    # the engine's log-probs: some far below the trainer's (weight capped), some above (weight < 1)
    offsets = [1.0, -0.3, 0.05, 2.0, -1.0, 0.0]
    rollout_logprobs = torch.tensor([value - offset for value, offset in zip(sampler, offsets)])
    weights = [min(math.exp(o - r), cap) for o, r in zip(sampler, rollout_logprobs.tolist())]
    assert any(w == cap for w in weights) and any(w < 1 for w in weights), "the case lost a capped or a small weight"

    loss_fn = OPDRLLoss(epsilon=0.2, epsilon_high=0.3, teacher_kl_coef=0.7, temperature=0.8, vocab_size=vocab,
                        importance_sampling_cap=cap)
    hidden_t = hidden.clone().double().requires_grad_(True)
    head_t = head.clone().double().requires_grad_(True)
    rollout = RolloutTokens(base, teacher_logprobs, old, rollout_logprobs)
    loss, _, metrics = loss_fn(hidden_t, head_t, labels, mask, rollout)
    loss.backward()

    hidden_ref = hidden.double().requires_grad_(True)
    head_ref = head.double().requires_grad_(True)
    logp_ref = torch.log_softmax((hidden_ref @ head_ref.T)[..., :vocab] / 0.8, dim=-1)
    expected = 0.0
    for n, (b, s) in enumerate(flat):
        logp = logp_ref[b, s, labels[b, s]]
        advantage = base[n].item() + 0.7 * (teacher_logprobs[n].item() - sampler[n])
        ratio = torch.exp(logp - sampler[n])
        surrogate = -torch.minimum(ratio * advantage, ratio.clamp(0.8, 1.3) * advantage)
        expected = expected + weights[n] * surrogate
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-9)
    torch.testing.assert_close(hidden_t.grad, hidden_ref.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(head_t.grad, head_ref.grad, rtol=1e-6, atol=1e-9)
    assert metrics["importance_weight_sum"].item() == pytest.approx(sum(weights), rel=1e-6)
    assert metrics["importance_capped_sum"].item() == sum(w == cap for w in weights)
    with pytest.raises(ValueError, match="rollout_importance_sampling_cap"):
        loss_fn(hidden.double(), head.double(), labels, mask, RolloutTokens(base, teacher_logprobs, old))
