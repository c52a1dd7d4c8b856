"""A step's examples -> equal-shaped microbatches for Megatron's schedule."""

from __future__ import annotations

from megatron_opd.config.job import JobConfig
from megatron_opd.data import collate
from megatron_opd.pipeline.schedule import Microbatch


def make_microbatches(examples: list[dict], pad_id: int, config: JobConfig) -> list[Microbatch]:
    """`examples` padded to their longest sequence (a multiple of 8, and of TP under
    sequence parallelism) and split into microbatches of `training.micro_batch_size`.
    Megatron's schedule runs every microbatch of a step at one `[b, s + 1]` shape."""
    parallel = config.parallel
    multiple = 8 * (parallel.tensor_model_parallel_size if parallel.sequence_parallel else 1)
    batch = collate(examples, pad_id, pad_to_multiple_of=multiple)
    tokens, loss_mask = batch["tokens"], batch["loss_mask"].bool()
    size = config.training.micro_batch_size
    return [Microbatch(tokens[start:start + size], loss_mask[start:start + size])
            for start in range(0, len(examples), size)]
