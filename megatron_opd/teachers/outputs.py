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

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

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


@dataclass
class TeacherPart:
    """One teacher's answer for its rows of a microbatch."""

    name: str
    answer: TeacherOutput  # over the part's n tokens, in the order of `index`
    index: Optional[torch.Tensor]  # [n] int64 positions among the microbatch's N tokens; None: all N, in order
    temperature: float
    topk: Optional[int]  # the top-K of this teacher's divergence (None: full vocab)


@dataclass
class TeacherMix:
    """A microbatch's teacher signal: the answers of its rows' teachers (one or several).

    `parts` cover the N response tokens exactly once; `names`: every teacher of the run, in
    config order (per-teacher metrics list each, zero where a teacher has no rows, so that
    every data-parallel rank reduces the same keys); `report`: whether to emit them (runs with
    two or more teachers)."""

    parts: list[TeacherPart]
    num_tokens: int
    names: tuple[str, ...] = ()
    report: bool = False
    _order: Optional[torch.Tensor] = field(default=None, repr=False)

    def _assemble(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """The parts' `[n_i]` values -> `[N]` in token order (differentiable)."""
        if len(pieces) == 1 and self.parts[0].index is None:
            return pieces[0]
        if self._order is None:
            positions = torch.cat([part.index for part in self.parts])
            self._order = torch.empty_like(positions)
            self._order[positions] = torch.arange(positions.numel(), device=positions.device)
        return torch.cat(list(pieces))[self._order.to(pieces[0].device)]

    def _rows(self, values: torch.Tensor, part: TeacherPart) -> torch.Tensor:
        return values if part.index is None else values[part.index.to(values.device)]

    def per_part(self, compute) -> torch.Tensor:
        """`[N]` from `compute(part, rows) -> [n]` per part, `rows(values [N, ...])` picking the
        part's tokens; in token order."""
        return self._assemble([compute(part, lambda values, part=part: self._rows(values, part))
                               for part in self.parts])

    def divergence(self, student_hidden: torch.Tensor, student_head: torch.Tensor, *, beta: float,
                   vocab_size: int) -> torch.Tensor:
        """`[N]` D_beta(P_T || P_S) per token, each against its row's teacher at that teacher's
        temperature and top-K."""
        return self.per_part(lambda part, rows: part.answer.divergence(
            rows(student_hidden), student_head, beta=beta, temperature=part.temperature, topk=part.topk,
            vocab_size=vocab_size))

    def token_logprobs(self, token_ids: torch.Tensor, *, vocab_size: int) -> torch.Tensor:
        """`[N]` log P_T(token) of each row's teacher at its temperature."""
        return self.per_part(lambda part, rows: part.answer.token_logprobs(
            rows(token_ids), temperature=part.temperature, vocab_size=vocab_size))

    def groups(self) -> list[tuple[str, Optional[torch.Tensor]]]:
        """(teacher name, its token positions `[n]`, None for all) of every teacher of the run
        when per-teacher metrics are reported, else []."""
        if not self.report:
            return []
        found = {part.name: part.index for part in self.parts}
        empty = torch.zeros(0, dtype=torch.int64)
        return [(name, found[name] if name in found else empty) for name in self.names]


def as_mix(answer: Union[TeacherOutput, TeacherMix], temperature: float, topk: Optional[int]) -> TeacherMix:
    """A loss's teacher signal as a `TeacherMix` (a bare answer: one teacher over all tokens,
    with the loss's own temperature and top-K)."""
    if isinstance(answer, TeacherMix):
        return answer
    count = answer.hidden.shape[0] if isinstance(answer, TeacherHidden) else answer.ids.shape[0]
    return TeacherMix([TeacherPart("teacher", answer, None, temperature, topk)], count)


def sums_by_teacher(groups: list[tuple[str, Optional[torch.Tensor]]], values: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """Per-teacher metric sums of per-token values `[N]`: `<metric>/<teacher>_sum` (summed over
    the teacher's tokens; the trainer divides by the global token count, so they add up to
    `<metric>`) and `tokens/<teacher>_count`."""
    sums: dict[str, torch.Tensor] = {}
    for name, index in groups:
        for metric, per_token in values.items():
            picked = per_token if index is None else per_token[index.to(per_token.device)]
            sums[f"{metric}/{name}_sum"] = picked.detach().double().sum()
        first = next(iter(values.values()))
        count = first.numel() if index is None else index.numel()
        sums[f"tokens/{name}_count"] = torch.tensor(float(count), dtype=torch.float64, device=first.device)
    return sums
