"""Fit a tokenized row into `max_length` tokens (ms-swift's truncation strategies).

A row is a prompt (the ids before the first response token), a response (everything
from it on, later user turns of a conversation included) and optionally a teacher prompt
that replaces the prompt in the teacher's view. Both views must fit, so the budget is
P* + R <= max_length with P* the longer of the two prompts and R the response length
(at least 1 for a prompt-only row, which must leave room to generate one token).

- "right": keep the first max_length - P* response tokens; a row whose prompt alone
  fills max_length (P* >= max_length) is malformed ("fully_truncated").
- "left": keep the last K = max(1, max_length - R) tokens of each prompt (the response
  stays whole when it fits beside one prompt token), then keep the first
  max_length - K response tokens (cut only when the response alone is too long). At
  least one prompt token stays so that the first response token is predicted.
- "delete": drop the row ("too_long", counted, not an error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_opd.data.errors import FULLY_TRUNCATED, TOO_LONG, RowProblem


@dataclass
class Encoded:
    """One tokenized row: `input_ids` and `loss_mask` of equal length, the first
    `prompt_length` ids are the prompt; `teacher_prompt_ids` replaces them for the teacher."""

    input_ids: list[int]
    loss_mask: list[int]
    prompt_length: int
    teacher_prompt_ids: Optional[list[int]] = None


def truncate(row: Encoded, max_length: int, strategy: str) -> tuple[Encoded, bool]:
    """`(row fitted to max_length, whether anything was cut)`; raises RowProblem when the
    row cannot be kept."""
    prompt = row.input_ids[:row.prompt_length]
    prompt_mask = row.loss_mask[:row.prompt_length]
    response = row.input_ids[row.prompt_length:]
    response_mask = row.loss_mask[row.prompt_length:]
    teacher = row.teacher_prompt_ids
    longest_prompt = max(len(prompt), len(teacher) if teacher is not None else 0)
    if longest_prompt + max(len(response), 1) <= max_length:
        return row, False
    if strategy == "delete":
        raise RowProblem(TOO_LONG, f"{longest_prompt} prompt + {len(response)} response tokens "
                         f"exceed data.max_length={max_length}", always_skip=True)
    if strategy == "right":
        if longest_prompt >= max_length:
            which = "teacher_prompt" if teacher is not None and len(teacher) > len(prompt) else "prompt"
            raise RowProblem(FULLY_TRUNCATED, f"the {which} alone has {longest_prompt} tokens, leaving no "
                             f"room for the response in data.max_length={max_length} (with "
                             "data.truncation_strategy='right', which cuts only the response); raise "
                             f"data.max_length to {longest_prompt + max(len(response), 1)} to keep the whole "
                             "row, or set data.truncation_strategy='left' (cut the prompt's start) or "
                             "'delete' (drop such rows), or data.skip_bad_rows=true (skip them)")
        keep = max_length - longest_prompt
        return Encoded(prompt + response[:keep], prompt_mask + response_mask[:keep], len(prompt), teacher), True
    if strategy == "left":
        kept_prompt = max(1, max_length - max(len(response), 1))
        prompt, prompt_mask = prompt[-kept_prompt:], prompt_mask[-kept_prompt:]
        if teacher is not None:
            teacher = teacher[-kept_prompt:]
        keep = max_length - max(len(prompt), len(teacher) if teacher is not None else 0)
        return Encoded(prompt + response[:keep], prompt_mask + response_mask[:keep], len(prompt), teacher), True
    raise ValueError(f"unknown truncation strategy {strategy!r}")


__all__ = ["Encoded", "truncate"]
