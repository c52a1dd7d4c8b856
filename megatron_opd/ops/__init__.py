"""Vocab-parallel math on tensor-parallel shards of the vocabulary."""

from megatron_opd.ops.divergence import (
    fused_linear_divergence,
    fused_linear_sparse_divergence,
    sparse_teacher_divergence,
    vocab_parallel_divergence,
    vocab_parallel_sample,
    fused_linear_token_logprobs,
    vocab_parallel_token_logprobs,
)
from megatron_opd.ops.vocab_parallel import fused_linear_topk_logprobs

__all__ = [
    "fused_linear_divergence",
    "fused_linear_sparse_divergence",
    "fused_linear_token_logprobs",
    "fused_linear_topk_logprobs",
    "sparse_teacher_divergence",
    "vocab_parallel_divergence",
    "vocab_parallel_sample",
    "vocab_parallel_token_logprobs",
]
