"""Parallel layout: tensor, pipeline and sequence parallelism, and the seed."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_opd.config.schema import check


@dataclass
class ParallelConfig:
    """How the model is split across ranks. Data parallel size is what remains of the world."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    seed: int = 1234

    def __post_init__(self) -> None:
        check(self.tensor_model_parallel_size >= 1, "parallel.tensor_model_parallel_size",
              self.tensor_model_parallel_size, "an integer >= 1")
        check(self.pipeline_model_parallel_size >= 1, "parallel.pipeline_model_parallel_size",
              self.pipeline_model_parallel_size, "an integer >= 1")
        # Megatron-LM silently turns sequence parallel off at TP=1; we refuse instead, so
        # that a config never claims a layout it does not run.
        check(not self.sequence_parallel or self.tensor_model_parallel_size > 1,
              "parallel.sequence_parallel", self.sequence_parallel,
              "true only with tensor_model_parallel_size > 1")
        check(self.seed >= 0, "parallel.seed", self.seed, "an integer >= 0")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size for `world_size` ranks; raises when the layout does not divide it."""
        check(world_size % self.model_parallel_size == 0,
              "parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size",
              self.model_parallel_size, f"a divisor of the world size {world_size}")
        return world_size // self.model_parallel_size
