"""Packed rows' attention inputs: each example's own positions and causal mask (`pipeline.packing`)."""

from __future__ import annotations

import torch


def packed_inputs(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """segments `[b, s]` -> position ids `[b, s]` (0 at each example's first token) and the
    block-diagonal causal mask `[b, 1, s, s]` (True: masked), as Megatron's local attention takes it."""
    b, s = segments.shape
    index = torch.arange(s, device=segments.device).expand(b, s)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    position_ids = index - first
    same = segments.unsqueeze(2) == segments.unsqueeze(1)  # [b, s(query), s(key)]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    return position_ids, ~(same & causal).unsqueeze(1)
