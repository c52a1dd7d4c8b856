"""A teacher's answer for one microbatch, on the last pipeline stage, in the two forms teachers give.

Every loss reads the teacher through the two methods both forms have, so GKD, OPD-RL
and the evaluation losses do not care where the teacher lives:

    divergence(student_hidden [N, H], student_head [V/tp, H], ...) -> [N]
    token_logprobs(token_ids [N], ...)                            -> [N]

N is the microbatch's loss-mask count, row-major: row i's response tokens in order.

- `TeacherHidden` (an in-process Megatron teacher): final hidden states `[N, H_T]` and the
  LM-head shard, the teacher's full distribution, applied chunk by chunk inside the loss.
- `TeacherTopK` (a teacher server or the teacher cache): the teacher known only at its
  K most likely ids per token, full-vocab log-probabilities at temperature 1 `[N, K]`
  (as vLLM's `prompt_logprobs` and our server return them), plus the log-probability of
  the token actually at each position. GKD on it is the renormalized top-K divergence
  (ms-swift's `gkd_logits_topk`): exact at any temperature, since renormalizing
  `logprobs / tau` over the K ids equals renormalizing the tempered logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron_opd.ops import (
    fused_linear_divergence,
    fused_linear_sparse_divergence,
    fused_linear_token_logprobs,
    fused_linear_topk_logprobs,
)


@dataclass
class TeacherHidden:
    """An in-process teacher's output: its full distribution, through its LM head."""

    hidden: torch.Tensor  # [N, H_T] at the response tokens, no grad
    head_weight: torch.Tensor  # [V/tp, H_T], no grad

    def divergence(self, student_hidden: torch.Tensor, student_head: torch.Tensor, *, beta: float,
                   temperature: float, topk: Optional[int], vocab_size: int) -> torch.Tensor:
        """`[N]` D_beta(P_T || P_S) per token (full vocab, or the teacher's renormalized top-K)."""
        return fused_linear_divergence(student_hidden, student_head, self.hidden, self.head_weight, beta=beta,
                                       temperature=temperature, topk=topk, vocab_size=vocab_size, reduction="none")

    def token_logprobs(self, token_ids: torch.Tensor, *, temperature: float, vocab_size: int) -> torch.Tensor:
        """`[N]` log P_T(token) of the tempered distribution."""
        return fused_linear_token_logprobs(self.hidden, self.head_weight, token_ids, temperature=temperature,
                                           vocab_size=vocab_size)

    def topk(self, k: int, token_ids: torch.Tensor, vocab_size: int) -> "TeacherTopK":
        """The same answer as a server gives it (temperature 1), e.g. for the teacher cache."""
        logprobs, ids, token_logprobs = fused_linear_topk_logprobs(self.hidden, self.head_weight, k,
                                                                   token_ids=token_ids, vocab_size=vocab_size)
        return TeacherTopK(logprobs, ids, token_logprobs)


@dataclass
class TeacherTopK:
    """A teacher known at its K most likely ids per token (temperature 1), as servers return it."""

    logprobs: torch.Tensor  # [N, K] fp32 full-vocab log-probabilities, sorted descending
    ids: torch.Tensor  # [N, K] global token ids
    label_logprobs: Optional[torch.Tensor] = None  # [N] log P_T of the token at each position

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def divergence(self, student_hidden: torch.Tensor, student_head: torch.Tensor, *, beta: float,
                   temperature: float, topk: Optional[int], vocab_size: int) -> torch.Tensor:
        """`[N]` D_beta over the teacher's `topk` most likely ids, both models renormalized there."""
        if topk is None or topk > self.k:
            raise ValueError(f"gkd_logits_topk={topk} is invalid for a teacher known at {self.k} ids per token "
                             f"(a server or cache): an integer <= {self.k}")
        return fused_linear_sparse_divergence(
            student_hidden, student_head, self.logprobs[:, :topk] / temperature, self.ids[:, :topk], beta=beta,
            temperature=temperature, normalize="renorm", vocab_size=vocab_size, reduction="none")

    def token_logprobs(self, token_ids: torch.Tensor, *, temperature: float, vocab_size: int) -> torch.Tensor:
        """`[N]` log P_T of the tokens at the positions (the ones the answer was asked for)."""
        if temperature != 1.0:
            raise ValueError(f"temperature={temperature} is invalid for a teacher known at K ids per token: "
                             "its log-probabilities are at temperature 1")
        if self.label_logprobs is None or self.label_logprobs.shape != token_ids.shape:
            raise ValueError("this teacher answer has no log-probabilities of the tokens asked about")
        return self.label_logprobs


TeacherOutput = Union[TeacherHidden, TeacherTopK]
