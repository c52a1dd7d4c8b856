"""Core attention of the local layer spec through torch's `scaled_dot_product_attention`.

Megatron-Core's local `DotProductAttention` computes attention as three unfused ops:
scores `[b * np, sq, sk]` by `baddbmm`, a masked softmax, and `bmm` with the values, after
repeating every key/value head for its query group. On CPU (where the local spec is the
only one) that materializes the scores and their softmax in the forward and again in the
backward; torch's fused kernel does neither and handles grouped-query attention itself.
Measured (fp32, one thread, forward + backward): 2.5x faster at the quickstart's shapes
([10, 64, 4 heads / 2 groups, 32]) and 2.9x at [512, 4, 14 / 2, 64], a Qwen2.5-0.5B layer.

Only the case torch's kernel computes exactly as Megatron's does takes this path: causal
self-attention without an explicit mask (or one query row against its KV cache), or
self-attention with a boolean mask `[b, 1, s, s]` that leaves every query a key (packed rows'
block-diagonal causal mask, `pipeline.segments`; Megatron fills masked scores with -10000,
whose exponential is 0 as -inf's), vanilla softmax, no sliding window, no attention bias or
THD packed sequences, no dropout while training.

A packed row's mask from `pipeline.segments.packed_inputs` also says where its examples start
(`mark_block_diagonal`): attention then runs block by block, each block whole examples of at
most `PACKED_BLOCK_TOKENS` positions (or one longer example, plain causal), so a row of T
positions costs about T x 256 scores instead of T x T. Exact: no query of a block may see a key
outside it. A mask without the mark (one Megatron rebuilt, or detached by a recompute) is used
whole, which is exact too, only slower. Everything else is `DotProductAttention`'s own forward, unchanged; the weights,
checkpoints and sharded state dict are its own.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_opd.runtime import cpu_mode

PACKED_BLOCK_TOKENS = 256
_SEGMENT_STARTS = "megatron_opd_segment_starts"


def mark_block_diagonal(mask: torch.Tensor, starts: list[int]) -> None:
    """Mark a one-row mask `[1, 1, s, s]` as block-diagonal causal with segments starting at
    `starts` (0 first): the caller's promise, which `SDPAttention` uses to attend block by block."""
    setattr(mask, _SEGMENT_STARTS, starts)


def _blocks(starts: list[int], length: int) -> list[tuple[int, int, bool]]:
    """Consecutive segments grouped into blocks `(start, end, single segment)` of at most
    `PACKED_BLOCK_TOKENS` positions; a longer segment is a block of its own."""
    ends = starts[1:] + [length]
    blocks: list[list[int]] = []
    for start, end in zip(starts, ends):
        if blocks and end - blocks[-1][0] <= PACKED_BLOCK_TOKENS:
            blocks[-1][1], blocks[-1][2] = end, blocks[-1][2] + 1
        else:
            blocks.append([start, end, 1])
    return [(start, end, count == 1) for start, end, count in blocks]


class SDPAttention(DotProductAttention):
    """`DotProductAttention` with its common case through `F.scaled_dot_product_attention`.

    query `[sq, b, np/tp, hn]`, key and value `[sk, b, ng/tp, hn]` -> context `[sq, b, np/tp * hn]`.
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        if not self._fused_applies(query, key, attention_mask, attention_bias, packed_seq_params):
            with cpu_mode.redirecting():  # Megatron's default causal mask is made with device="cuda"
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                       packed_seq_params)
        sq, batch = query.shape[:2]
        # As DotProductAttention's softmax: the default causal mask when sq > 1; a single query
        # row (decoding against the KV cache) attends to every cached position.
        causal = self.attn_mask_type == AttnMaskType.causal and sq > 1 and attention_mask is None
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        query, key, value = (tensor.permute(1, 2, 0, 3) for tensor in (query, key, value))  # [b, heads, s, hn]
        starts = getattr(attention_mask, _SEGMENT_STARTS, None)
        if starts is not None and batch == 1:  # a packed row: block by block
            blocks = _blocks(starts, sq)
            sizes = [end - start for start, end, _ in blocks]
            parts = []  # split, not sliced: split's backward is one cat, a slice's a full-size zero tensor each
            for (start, end, single), q, k, v in zip(blocks, query.split(sizes, dim=2), key.split(sizes, dim=2),
                                                     value.split(sizes, dim=2)):
                allowed = None if single else ~attention_mask[..., start:end, start:end]
                parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=single,
                                                            scale=scale, enable_gqa=gqa))
            context = torch.cat(parts, dim=2)
        else:
            allowed = ~attention_mask if attention_mask is not None else None  # torch's boolean mask: True attends
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, is_causal=causal,
                                                     scale=scale, enable_gqa=gqa)
        return context.permute(2, 0, 1, 3).reshape(sq, batch, self.hidden_size_per_partition)

    def _fused_applies(self, query, key, attention_mask, attention_bias, packed_seq_params) -> bool:
        scale_mask_softmax = self.scale_mask_softmax
        explicit = attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4
                                              and query.size(0) == key.size(0))
        return (explicit and attention_bias is None and packed_seq_params is None
                and self.softmax_offset is None and scale_mask_softmax.window_size is None
                and self.attn_mask_type in (AttnMaskType.causal, AttnMaskType.no_mask)
                and (query.size(0) == key.size(0) or query.size(0) == 1)
                and not (self.training and self.attention_dropout.p > 0)
                # Megatron's half-precision softmax in the input dtype (attention_softmax_in_fp32
                # off) rounds differently from torch's kernel, which accumulates in fp32.
                and (query.dtype == torch.float32 or self.config.attention_softmax_in_fp32))


__all__ = ["SDPAttention"]
