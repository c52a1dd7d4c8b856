"""One microbatch of a step on this data-parallel rank, and where each of its examples sits in it.

A microbatch holds its examples either one per row (fixed rows, token budget: `batching`) or
packed several per row (`packing`). Everything that reads per-example values out of a
microbatch (a teacher cache's rows, a teacher server's requests, OPD-RL's advantages, one
teacher's share of a mixed microbatch) goes through `example_spans` / `example_token_counts`,
so it reads packed and unpacked microbatches alike. Either way the loss mask, read row-major,
lists the examples' counted tokens in `rows` order, each example's contiguous: the order the
losses flatten `hidden[loss_mask]` in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Microbatch:
    """tokens `[b, s + 1]`: inputs followed by their next-token labels; loss_mask `[b, s]`:
    True where predicting `tokens[:, t + 1]` counts; rows: the index of each example in the
    step's example list (microbatches built by a token budget hold the examples sorted by
    length; packed ones several per row, in packing order).

    Packed microbatches (`pipeline.packing`) also carry `segments` `[b, s]` (the example of each
    input position: 1, 2, ... in its row, 0 for padding) and `spans` (per example, in `rows`
    order: `(row, start, length)`, its `length` tokens at `tokens[row, start:start + length]`).
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    rows: tuple[int, ...] = ()
    segments: Optional[torch.Tensor] = None
    spans: Optional[tuple[tuple[int, int, int], ...]] = None

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def labels(self) -> torch.Tensor:
        return self.tokens[:, 1:]

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def packed(self) -> bool:
        return self.spans is not None

    def to(self, device: torch.device) -> "Microbatch":
        segments = self.segments.to(device) if self.segments is not None else None
        return Microbatch(self.tokens.to(device), self.loss_mask.to(device), self.rows, segments, self.spans)

    def example_spans(self) -> list[tuple[int, int, int]]:
        """Per example in `rows` order, `(row, start, length)`: its tokens are
        `tokens[row, start:start + length]` and the mask of their labels
        `loss_mask[row, start:start + length - 1]` (its last position would predict the next
        example's first token, and counts nothing). Unpacked: each example its whole row,
        padding included (padding counts nothing)."""
        if self.spans is not None:
            return list(self.spans)
        width = self.tokens.shape[1]
        return [(row, 0, width) for row in range(self.tokens.shape[0])]

    def example_token_counts(self) -> list[int]:
        """Each example's counted tokens, in `rows` order (they sum to `num_tokens`)."""
        if self.spans is None:
            return [int(count) for count in self.loss_mask.sum(dim=1).tolist()]
        mask = self.loss_mask.tolist()
        return [sum(mask[row][start:start + length - 1]) for row, start, length in self.spans]

    def example_sequences(self) -> list[tuple[list[int], list[bool]]]:
        """Per example in `rows` order, its token ids and the loss mask of their labels
        (`len(ids) - 1` values), as the spans cut them out."""
        tokens, mask = self.tokens.tolist(), self.loss_mask.tolist()
        return [(tokens[row][start:start + length], mask[row][start:start + length - 1])
                for row, start, length in self.example_spans()]
