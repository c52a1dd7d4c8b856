"""Sequence packing: several examples in one row, each with its own positions and causal mask.

`training.pack_sequences` (with `training.max_tokens_per_microbatch` = T): a step's examples on
a data-parallel rank are packed first fit, longest first, into rows of at most T tokens, one
row per microbatch. A packed row `[s + 1]` holds examples back to back; `segments [b, s]`
numbers the example each input position belongs to (1, 2, ... in the row; 0 for padding), and
`spans` say where each example sits (`pipeline.microbatch`). Two ways to run it
(`pipeline.schedule`):

- CPU / Megatron's local layer spec: a block-diagonal causal mask `[b, 1, s, s]` and positions
  restarting at 0 in each example (`segments.packed_inputs`). Rotary embeddings only see
  position differences, so an example's attention is its unpacked attention; learned absolute
  position embeddings read the restarted position ids. Tested against the unpacked forward /
  backward (`tests/test_packing.py`) and the unpacked training step (`tests/test_token_budget.py`).
- GPU / Transformer Engine: THD with Megatron's `PackedSeqParams` (cumulative sequence lengths;
  `segments.thd_packed_seq_params`). Written against Megatron-Core's documented API and
  **untested here** (no Transformer Engine on CPU).

Labels never cross examples: the position before an example's first token predicts nothing
(its loss mask is 0), so the per-token losses of a packed row are those of its examples, in
`rows` order, and the per-example readers (teacher cache and server, OPD-RL's advantages, one
teacher's share of a mixed microbatch: `select_examples`) find each example through its span.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_opd.data import collate
from megatron_opd.pipeline.microbatch import Microbatch


def pack_rows(lengths: Sequence[int], row_length: int) -> list[tuple[int, ...]]:
    """Examples (indices into `lengths`, tokens each) into rows of at most `row_length` tokens:
    first fit, longest first (ties in their order). An example longer than `row_length` gets a
    row of its own."""
    rows: list[list[int]] = []
    used: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row, total in enumerate(used):
            if total + lengths[index] <= row_length:
                rows[row].append(index)
                used[row] += lengths[index]
                break
        else:
            rows.append([index])
            used.append(lengths[index])
    return [tuple(row) for row in rows]


def pack_examples(examples: Sequence[dict], rows: Sequence[Sequence[int]], pad_id: int,
                  pad_to_multiple_of: int = 8, seq_length: Optional[int] = None) -> Microbatch:
    """One microbatch whose row i holds `examples[j] for j in rows[i]` back to back (right-padded
    to a multiple of `pad_to_multiple_of`, or to exactly `seq_length` input positions).

    tokens `[b, s + 1]`, loss_mask `[b, s]` (each example's own shifted mask; 0 where a label would
    be the next example's first token), segments `[b, s]`, spans and rows: the examples in packing order.
    """
    packed, spans = [], []
    for number, row in enumerate(rows):
        input_ids: list[int] = []
        label_mask: list[int] = []  # collate shifts `loss_mask` by one: keep each example's shift inside it
        for index in row:
            example = examples[index]
            spans.append((number, len(input_ids), len(example["input_ids"])))
            input_ids += list(example["input_ids"])
            label_mask += list(example["loss_mask"][1:]) + [0]
        packed.append({"input_ids": input_ids, "loss_mask": [0] + label_mask[:-1]})
    batch = collate(packed, pad_id, seq_length=seq_length, pad_to_multiple_of=pad_to_multiple_of)
    segments = torch.zeros_like(batch["tokens"][:, :-1])
    for number, (row, start, length) in enumerate(spans):
        segments[row, start:start + length] = number + 1  # unique in the row (numbers only compare)
    return Microbatch(batch["tokens"], batch["loss_mask"].bool(), tuple(index for row in rows for index in row),
                      segments=segments, spans=tuple(spans))


def select_examples(batch: Microbatch, positions: Sequence[int]) -> Microbatch:
    """The microbatch of `batch`'s examples at `positions` (indices into `batch.rows`), of the
    same padded length: those rows of an unpacked batch, or those examples packed into one row."""
    if not batch.packed:
        index = torch.as_tensor(list(positions), dtype=torch.long)
        return Microbatch(batch.tokens[index], batch.loss_mask[index], tuple(batch.rows[i] for i in positions))
    sequences = batch.example_sequences()
    examples = [{"input_ids": sequences[i][0], "loss_mask": [0] + [int(counted) for counted in sequences[i][1]]}
                for i in positions]
    # In order (the losses read the examples' tokens in `rows` order), a new row where one would overflow.
    width, rows, used = batch.tokens.shape[1], [[]], 0
    for index, example in enumerate(examples):
        if rows[-1] and used + len(example["input_ids"]) > width:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += len(example["input_ids"])
    selected = pack_examples(examples, rows, pad_id=0, pad_to_multiple_of=1, seq_length=width - 1)
    selected.rows = tuple(batch.rows[i] for i in positions)
    return selected
