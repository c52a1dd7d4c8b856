"""Dense single-process float64 reference for the divergences, written from the spec.

Nothing here imports `megatron_opd`: full (unsharded) logits `[..., V]` in, per-token
divergences `[...]` (float64) out, differentiable by autograd with respect to the
student logits. `-inf` logits are allowed where both distributions put zero mass
(same ids in teacher and student); the convention 0 log 0 = 0 is applied with
`torch.where` on finite branches only, so autograd never meets `0 * inf`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def log_probs(logits: torch.Tensor, temperature: float, vocab_size: int | None = None) -> torch.Tensor:
    """log softmax(logits / temperature) over the true vocab, float64."""
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    return F.log_softmax(logits[..., :vocab_size].double() / temperature, dim=-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = sum_i p_i (log p_i - log q_i) over the last dim, with 0 log 0 = 0."""
    present = torch.isfinite(logp)
    safe_p = torch.where(present, logp, torch.zeros_like(logp))
    safe_q = torch.where(present, logq, torch.zeros_like(logq))
    terms = torch.where(present, safe_p.exp() * (safe_p - safe_q), torch.zeros_like(logp))
    return terms.sum(-1)


def log_mixture(logp_t: torch.Tensor, logp_s: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta P_T + (1 - beta) P_S) for 0 < beta < 1; -inf where both are 0."""
    a = logp_t + torch.log(torch.tensor(beta, dtype=torch.float64))
    b = logp_s + torch.log(torch.tensor(1.0 - beta, dtype=torch.float64))
    any_mass = torch.isfinite(a) | torch.isfinite(b)
    zero = torch.zeros_like(a)
    both = torch.stack([torch.where(any_mass, a, zero), torch.where(any_mass, b, zero)], dim=0)
    # Where exactly one of a, b is -inf, logsumexp is exact and its gradient to it is 0;
    # where both are, the stand-in zeros keep autograd finite and the result is -inf.
    return torch.where(any_mass, torch.logsumexp(both, dim=0), torch.full_like(a, NEG_INF))


def divergence_from_logprobs(logp_t: torch.Tensor, logp_s: torch.Tensor, beta: float) -> torch.Tensor:
    """beta = 0: KL(T||S); beta = 1: KL(S||T); else beta KL(T||M) + (1-beta) KL(S||M)."""
    if beta == 0:
        return kl(logp_t, logp_s)
    if beta == 1:
        return kl(logp_s, logp_t)
    log_m = log_mixture(logp_t, logp_s, beta)
    return beta * kl(logp_t, log_m) + (1 - beta) * kl(logp_s, log_m)


def _log_mass_outside(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of sum_{i not in ids} p_i, exactly (logsumexp of the complement), keepdim."""
    selected = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, ids, True)
    rest = logp.masked_fill(selected, NEG_INF)
    has_rest = torch.isfinite(rest).any(-1, keepdim=True)
    safe = torch.where(has_rest, rest, torch.zeros_like(rest))
    return torch.where(has_rest, torch.logsumexp(safe, -1, keepdim=True),
                       torch.full_like(has_rest, NEG_INF, dtype=logp.dtype))


def _tail_from_logprobs(logp_k: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_k p_k), keepdim; used for a teacher known only at K ids."""
    rest = (1.0 - logp_k.exp().sum(-1, keepdim=True)).clamp_min(0.0)
    return torch.log(rest)


def restrict(logp_t_k: torch.Tensor, logp_s_k: torch.Tensor, normalize: str,
             tail_t: torch.Tensor | None = None, tail_s: torch.Tensor | None = None):
    """The K-outcome (or K+1 for "tail") distributions of teacher and student."""
    if normalize == "renorm":
        return F.log_softmax(logp_t_k, -1), F.log_softmax(logp_s_k, -1)
    if normalize == "full":
        return logp_t_k, logp_s_k
    if normalize == "tail":
        return torch.cat([logp_t_k, tail_t], -1), torch.cat([logp_s_k, tail_s], -1)
    raise AssertionError(normalize)


def dense_divergence(student: torch.Tensor, teacher: torch.Tensor, *, beta: float, temperature: float = 1.0,
                     topk: int | None = None, normalize: str = "renorm",
                     vocab_size: int | None = None) -> torch.Tensor:
    """Per-token divergence `[...]`, float64; differentiable w.r.t. `student`."""
    logp_s = log_probs(student, temperature, vocab_size)
    logp_t = log_probs(teacher.detach(), temperature, vocab_size)
    if topk is None:
        return divergence_from_logprobs(logp_t, logp_s, beta)
    ids = logp_t.topk(topk, dim=-1).indices
    logp_t_k, logp_s_k = logp_t.gather(-1, ids), logp_s.gather(-1, ids)
    tail_t = _log_mass_outside(logp_t, ids) if normalize == "tail" else None
    tail_s = _log_mass_outside(logp_s, ids) if normalize == "tail" else None
    return divergence_from_logprobs(*restrict(logp_t_k, logp_s_k, normalize, tail_t, tail_s), beta)


def sparse_divergence(student: torch.Tensor, teacher_logp_k: torch.Tensor, ids: torch.Tensor, *, beta: float,
                      temperature: float = 1.0, normalize: str = "renorm",
                      vocab_size: int | None = None) -> torch.Tensor:
    """Teacher given as full-vocab log-probs at K global ids per token."""
    logp_s = log_probs(student, temperature, vocab_size)
    logp_s_k = logp_s.gather(-1, ids)
    logp_t_k = teacher_logp_k.double()
    tail_t = _tail_from_logprobs(logp_t_k) if normalize == "tail" else None
    tail_s = _log_mass_outside(logp_s, ids) if normalize == "tail" else None
    return divergence_from_logprobs(*restrict(logp_t_k, logp_s_k, normalize, tail_t, tail_s), beta)


def reduce(per_token: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if mask is None:
        mask = torch.ones(per_token.shape, dtype=torch.bool)
    counted = torch.where(mask, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return counted
    if reduction == "sum":
        return counted.sum()
    if reduction == "mean":
        return counted.sum() / max(int(mask.sum()), 1)
    raise AssertionError(reduction)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return log_probs(logits, temperature).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
