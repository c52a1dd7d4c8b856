"""Parallel layout: tensor, pipeline, sequence and expert parallelism, and the seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_opd.config.schema import check


@dataclass
class ParallelConfig:
    """How the model is split across ranks. Data parallel size is what remains of the world."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    seed: int = 1234
    # Mixture-of-experts models: the experts of each MoE layer split over this many ranks
    # (attention stays split by tensor_model_parallel_size); must divide the expert count.
    expert_model_parallel_size: int = 1
    # Each expert's weights split over this many ranks; null: tensor_model_parallel_size.
    expert_tensor_parallel_size: Optional[int] = None

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
        check(self.expert_model_parallel_size >= 1, "parallel.expert_model_parallel_size",
              self.expert_model_parallel_size, "an integer >= 1")
        check(self.expert_tensor_parallel_size is None or self.expert_tensor_parallel_size >= 1,
              "parallel.expert_tensor_parallel_size", self.expert_tensor_parallel_size, "an integer >= 1, or null")

    @property
    def expert_tensor_size(self) -> int:
        """The expert tensor-parallel size in effect (Megatron's default: the attention's TP)."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size for `world_size` ranks; raises when the layout does not divide it."""
        check(world_size % self.model_parallel_size == 0,
              "parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size",
              self.model_parallel_size, f"a divisor of the world size {world_size}")
        expert_ranks = self.expert_tensor_size * self.expert_model_parallel_size * self.pipeline_model_parallel_size
        check(world_size % expert_ranks == 0,
              "parallel.expert_tensor_parallel_size * parallel.expert_model_parallel_size * "
              "parallel.pipeline_model_parallel_size", expert_ranks, f"a divisor of the world size {world_size}")
        return world_size // self.model_parallel_size
