"""Vocab-parallel math on tensor-parallel shards of the vocabulary, one job per module.

    vocab_parallel   shared helpers: the shard layout, row chunks, softmax statistics
    logits_source    where logits come from: a tensor, or an LM head applied chunk by chunk
    divergence       forward KL / reverse KL / JSD(beta), full vocab and top-K
    token_logprobs   log-probabilities at given ids (SFT, OPD-RL)
    topk             the top-k ids and log-probs over the sharded vocab (a teacher's answer)
    sampling         sampling ids (Gumbel-max with per-row seeded, counter-based noise)
"""

from megatron_opd.ops.divergence import (
    fused_linear_divergence,
    fused_linear_sparse_divergence,
    sparse_teacher_divergence,
    vocab_parallel_divergence,
)
from megatron_opd.ops.sampling import vocab_parallel_sample
from megatron_opd.ops.token_logprobs import fused_linear_token_logprobs, vocab_parallel_token_logprobs
from megatron_opd.ops.topk import fused_linear_topk_logprobs

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
