"""A step's examples -> microbatches for Megatron's schedule: a fixed count of rows, a token budget, or packed rows.

Three ways to split the examples of a step on one data-parallel rank:

- fixed rows (`training.max_tokens_per_microbatch` null, the default): in order, every
  microbatch `training.micro_batch_size` rows, all padded to the step's longest example
  (one `[b, s + 1]` shape for the step);
- token budget (`training.max_tokens_per_microbatch` = T): the examples sorted by length,
  longest first, and cut greedily into groups whose padded size rows x s stays <= T, each
  group padded only to its own longest row. A single example longer than T gets a
  microbatch of its own (it is never cut). Short rows no longer pay for the longest one;
- packed (`training.pack_sequences` with the budget T): the examples packed first fit, longest
  first, into rows of at most T input positions, one row per microbatch, each example with its
  own positions and causal mask (`packing`): no padding between examples, only at a row's end.

Either way the loss is a sum over tokens normalized once by the global batch's token count
(`calculate_per_token_loss`), so how the examples are grouped does not change the step.
Each microbatch records which examples it holds (`Microbatch.rows`); per-example values
(a cache's rows, advantages, rollout log-probs) follow it through `rows`.
"""

from __future__ import annotations

from typing import Optional, Sequence

from megatron_opd.config.job import JobConfig
from megatron_opd.data import collate
from megatron_opd.pipeline.microbatch import Microbatch
from megatron_opd.pipeline.packing import pack_examples, pack_rows


def pad_multiple(config: JobConfig, device_type: str) -> int:
    """What a microbatch's input length s is a multiple of: TP under sequence parallelism (the
    sequence is split over the TP ranks), times 8 on CUDA (tensor-core-aligned shapes). On CPU
    there is nothing to align to and padding is pure cost: the quickstart's rows of about 10
    tokens padded to 16 made every step 1.5x the work."""
    parallel = config.parallel
    return (8 if device_type == "cuda" else 1) * (parallel.tensor_model_parallel_size
                                                  if parallel.sequence_parallel else 1)


def padded_length(length: int, multiple: int) -> int:
    """The model's input length s of a row of `length` tokens (s + 1 with its last label), padded."""
    s = max(length - 1, 1)
    return -(-s // multiple) * multiple


def plan_microbatches(lengths: Sequence[int], multiple: int, micro_batch_size: int,
                      max_tokens: Optional[int]) -> list[tuple[int, ...]]:
    """The rows (indices into `lengths`) of each microbatch.

    `max_tokens` None: consecutive groups of `micro_batch_size`. Else: rows by length, longest
    first (ties in their order), cut where one more row would make rows x s exceed
    `max_tokens` (s: the group's first, longest row padded to `multiple`); a row alone over the
    budget is its own microbatch. Deterministic: every rank of a TP / PP group plans the same.
    """
    if max_tokens is None:
        return [tuple(range(start, min(start + micro_batch_size, len(lengths))))
                for start in range(0, len(lengths), micro_batch_size)]
    order = sorted(range(len(lengths)), key=lambda row: -lengths[row])  # stable: ties keep their order
    groups: list[list[int]] = []
    width = 0
    for row in order:
        if groups and (len(groups[-1]) + 1) * width <= max_tokens:
            groups[-1].append(row)  # sorted: a later row is never longer than the group's first
        else:
            groups.append([row])
            width = padded_length(lengths[row], multiple)
    return [tuple(group) for group in groups]


def make_microbatches(examples: list[dict], pad_id: int, config: JobConfig, device_type: str,
                      rows: Optional[Sequence[Sequence[int]]] = None) -> list[Microbatch]:
    """`examples` as microbatches (`plan_microbatches` with `training.micro_batch_size` and
    `training.max_tokens_per_microbatch`, or `packing.pack_rows` with `training.pack_sequences`),
    or grouped as `rows` (the grouping of another view of the same examples, e.g. the teacher's
    prompts under OPSD; packed, each group one row).

    Fixed rows pad every microbatch to the step's longest example (today's one shape per step);
    a token budget pads each to its own longest row; packing pads each packed row at its end.
    Lengths are multiples of `pad_multiple(config, device_type)`.
    """
    training, multiple = config.training, pad_multiple(config, device_type)
    budget = training.max_tokens_per_microbatch
    if training.pack_sequences:
        if rows is None:  # rows of <= budget input positions: budget + 1 tokens with the last label
            rows = pack_rows([len(example["input_ids"]) for example in examples], budget + 1)
        return [pack_examples(examples, [group], pad_id, pad_to_multiple_of=multiple) for group in rows]
    if rows is None:
        rows = plan_microbatches([len(example["input_ids"]) for example in examples], multiple,
                                 training.micro_batch_size, budget)
    seq_length = None
    if budget is None:  # one shape for the step
        seq_length = max(padded_length(len(example["input_ids"]), multiple) for example in examples)
    microbatches = []
    for group in rows:
        batch = collate([examples[row] for row in group], pad_id, seq_length=seq_length,
                        pad_to_multiple_of=multiple)
        microbatches.append(Microbatch(batch["tokens"], batch["loss_mask"].bool(), tuple(group)))
    return microbatches


def padding_fraction(examples: Sequence[dict], microbatches: Sequence[Microbatch]) -> float:
    """Padding over all token positions (rows x (s + 1)) of `examples`' `microbatches`."""
    total = sum(batch.tokens.numel() for batch in microbatches)
    real = sum(len(examples[row]["input_ids"]) for batch in microbatches for row in batch.rows)
    return 1.0 - real / max(total, 1)
