"""Sequence packing: several examples in one row, each with its own positions and causal mask.

A packed row `[s + 1]` holds examples back to back; `segments [b, s]` numbers the example each
input position belongs to (1, 2, ... in the row; 0 for padding). Two ways to run it:

- CPU / Megatron's local layer spec: a block-diagonal causal mask `[b, 1, s, s]` (True where a
  query may not see a key: another example, or the future) and positions restarting at 0 in each
  example (`packed_inputs`). Rotary embeddings only see position differences, so an example's
  attention is its unpacked attention; learned absolute position embeddings read the restarted
  position ids. Tested against the unpacked forward / backward (`tests/test_packing.py`).
- GPU / Transformer Engine: THD, every example of the microbatch concatenated into one row with
  Megatron's `PackedSeqParams` (cumulative sequence lengths; `thd_packed_seq_params`). Written
  against Megatron-Core's documented API and **untested here** (no Transformer Engine on CPU).

Labels never cross examples: the position before an example's first token predicts nothing
(its loss mask is 0), so the per-token losses of a packed row are those of its examples.
Packing is a building block of `pipeline`: the trainer's per-row consumers (the teacher cache,
the teacher server's spans, OPD-RL's per-row advantages) still read one example per row, so the
trainer batches by a token budget (`batching`) and does not pack yet.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_opd.data import collate
from megatron_opd.pipeline.schedule import Microbatch
from megatron_opd.pipeline.segments import packed_inputs  # noqa: F401  (re-exported)


def pack_rows(lengths: Sequence[int], row_length: int) -> list[tuple[int, ...]]:
    """Examples (indices into `lengths`, tokens each) into rows of at most `row_length` tokens:
    first fit, longest first. An example longer than `row_length` gets a row of its own."""
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
                  pad_to_multiple_of: int = 8) -> Microbatch:
    """One microbatch whose row i holds `examples[j] for j in rows[i]` back to back (right-padded).

    tokens `[b, s + 1]`, loss_mask `[b, s]` (each example's own shifted mask; 0 where a label would
    be the next example's first token), segments `[b, s]`, rows: the examples in packing order.
    """
    packed = []
    for row in rows:
        input_ids: list[int] = []
        label_mask: list[int] = []  # collate shifts `loss_mask` by one: keep each example's shift inside it
        for index in row:
            example = examples[index]
            input_ids += list(example["input_ids"])
            label_mask += list(example["loss_mask"][1:]) + [0]
        packed.append({"input_ids": input_ids, "loss_mask": [0] + label_mask[:-1]})
    batch = collate(packed, pad_id, pad_to_multiple_of=pad_to_multiple_of)
    segments = torch.zeros_like(batch["tokens"][:, :-1])
    for i, row in enumerate(rows):
        start = 0
        for number, index in enumerate(row, start=1):
            length = len(examples[index]["input_ids"])
            segments[i, start:start + length] = number
            start += length
    return Microbatch(batch["tokens"], batch["loss_mask"].bool(), tuple(index for row in rows for index in row),
                      segments=segments)


def thd_packed_seq_params(lengths: Sequence[int], device: torch.device):
    """Megatron's `PackedSeqParams` for THD attention under Transformer Engine: examples of
    `lengths` input tokens concatenated in one row `[1, sum(lengths)]`. UNTESTED here (needs TE
    on GPU): written against Megatron-Core's documented fields."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cumulative = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cumulative[1:] = torch.cumsum(torch.as_tensor(lengths, dtype=torch.int32, device=device), dim=0)
    longest = int(max(lengths))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cumulative, cu_seqlens_kv=cumulative,
                           max_seqlen_q=longest, max_seqlen_kv=longest)
