"""Which engine samples the responses of on-policy steps, and how vLLM is run.

`engine: megatron` samples with the student's own Megatron model in place (any TP/PP,
CPU or GPU). `engine: vllm` samples with a vLLM engine colocated with the trainer (one
per data-parallel replica, on the replica's first rank) whose weights are pushed from the
Megatron student after every optimizer step. The `vllm_*` knobs are named as ms-swift
names them, so that a recipe reads the same in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_opd.config.schema import check

ENGINES = ("megatron", "vllm")


@dataclass
class RolloutConfig:
    engine: Literal["megatron", "vllm"] = "megatron"
    # vLLM (engine: vllm). GPU memory share of the colocated engine (weights + KV cache).
    vllm_gpu_memory_utilization: float = 0.5
    vllm_tensor_parallel_size: int = 1
    vllm_max_model_len: Optional[int] = None  # null: the model's max_position_embeddings
    vllm_max_num_seqs: int = 256
    # GPU: release the KV cache (sleep_level 1: also offload weights to CPU; 2: drop them,
    # the next sync re-sends them) while the trainer runs. vLLM's CPU build has no sleep.
    vllm_enable_sleep_mode: bool = False
    sleep_level: int = 1
    vllm_enforce_eager: Optional[bool] = None  # null: eager on CPU, CUDA graphs on GPU
    # Weight sync: HF tensors are pushed in buckets of at most this many MiB (a tensor
    # larger than a bucket goes alone): the extra memory a sync needs is about one bucket.
    weight_sync_bucket_mb: float = 512.0

    def __post_init__(self) -> None:
        check(self.engine in ENGINES, "rollout.engine", self.engine, f"one of {list(ENGINES)}")
        check(0 < self.vllm_gpu_memory_utilization <= 1, "rollout.vllm_gpu_memory_utilization",
              self.vllm_gpu_memory_utilization, "in (0, 1]")
        check(self.vllm_tensor_parallel_size >= 1, "rollout.vllm_tensor_parallel_size",
              self.vllm_tensor_parallel_size, "an integer >= 1")
        if self.vllm_max_model_len is not None:
            check(self.vllm_max_model_len >= 2, "rollout.vllm_max_model_len", self.vllm_max_model_len,
                  "an integer >= 2, or null for the model's max_position_embeddings")
        check(self.vllm_max_num_seqs >= 1, "rollout.vllm_max_num_seqs", self.vllm_max_num_seqs, "an integer >= 1")
        check(self.sleep_level in (1, 2), "rollout.sleep_level", self.sleep_level,
              "1 (offload weights, free the KV cache) or 2 (drop both)")
        check(self.weight_sync_bucket_mb > 0, "rollout.weight_sync_bucket_mb", self.weight_sync_bucket_mb,
              "a number > 0 (MiB)")
