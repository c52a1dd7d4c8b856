"""Packed rows' attention inputs (`pipeline.packing`): each example's own positions and causal mask
for Megatron's local spec, or its boundaries as THD `PackedSeqParams` for Transformer Engine."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_opd.models.sdpa_attention import mark_block_diagonal


def packed_inputs(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """segments `[b, s]` -> position ids `[b, s]` (0 at each example's first token) and the
    block-diagonal causal mask `[b, 1, s, s]` (True: masked), as Megatron's local attention takes it.
    A one-row mask carries its segments' starts (`SEGMENT_STARTS`, the padding tail's too)."""
    b, s = segments.shape
    starts = _starts(segments)
    position_ids = packed_positions(segments, starts)
    # Masked: another segment, or the future. In place: at s = 4096 each [s, s] pass costs ~4 ms.
    mask = segments.unsqueeze(2) != segments.unsqueeze(1)  # [b, s(query), s(key)]
    mask |= torch.ones(s, s, dtype=torch.bool, device=segments.device).triu_(1)
    mask = mask.unsqueeze(1)
    if b == 1:
        mark_block_diagonal(mask, torch.nonzero(starts[0]).flatten().tolist())
    return position_ids, mask


def packed_positions(segments: torch.Tensor, starts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """segments `[b, s]` -> position ids `[b, s]`, 0 at each example's first token (`starts`: the
    segments' starts, if already known)."""
    b, s = segments.shape
    index = torch.arange(s, device=segments.device).expand(b, s)
    starts = _starts(segments) if starts is None else starts
    return index - torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values


def thd_packed_seq_params(segments: torch.Tensor):
    """segments `[1, s]` (one packed row) -> Megatron's `PackedSeqParams` for THD attention under
    Transformer Engine: each run of one segment (the padding tail too) its own sequence.
    UNTESTED here (needs Transformer Engine on GPU): written against Megatron-Core's documented
    fields; `tools/gpu_train_check.py packed_thd_vs_unpacked` checks it on a GPU."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if segments.shape[0] != 1:
        raise ValueError(f"THD packing takes one packed row per microbatch, got {segments.shape[0]} rows")
    starts = torch.nonzero(_starts(segments)[0]).flatten()
    cumulative = torch.cat([starts, starts.new_tensor([segments.shape[1]])]).to(torch.int32)
    longest = int(cumulative.diff().max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cumulative, cu_seqlens_kv=cumulative,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _starts(segments: torch.Tensor) -> torch.Tensor:
    """`[b, s]` True where a new segment begins (each row's first position included)."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return starts
