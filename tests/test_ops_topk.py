"""`megatron_opd.ops.topk`: the top-k over the sharded vocab against torch.topk on full float64 logits.

References: float64 `torch.log_softmax` of the full, unsharded logits (padding ids cut off)
and `torch.topk` of it. The ops run at TP=1 in this process and at TP=2 (`run_distributed`),
where a shard may hold fewer ids than k, with chunk sizes that split the rows unevenly.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.ops import fused_linear_topk_logprobs
from megatron_opd.ops.logits_source import DenseLogits
from megatron_opd.ops.topk import sharded_topk
from megatron_opd.ops.vocab_parallel import vocab_shard
from megatron_opd.testing import run_distributed
from tests.ops_helpers import randn, shard, tp_rank

N, HIDDEN, VOCAB = 64, 8, 40
TRUE_VOCAB = VOCAB - 3  # the last 3 ids are padding


def head_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 hidden states `[N, H]`, an LM head `[V, H]` and target ids `[N]`."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, HIDDEN, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.float64) * 0.8
    ids = torch.randint(0, TRUE_VOCAB, (N,), generator=torch.Generator().manual_seed(5))
    return hidden, weight, ids


def topk_logprobs_on_rank(tp: int, k: int, chunk_size) -> tuple:
    rank = tp_rank(tp)
    hidden, weight, ids = head_inputs()
    return fused_linear_topk_logprobs(hidden, weight.chunk(tp)[rank], k, token_ids=ids, temperature=0.7,
                                      vocab_size=TRUE_VOCAB, chunk_size=chunk_size)


@pytest.mark.parametrize("tp,k,chunk_size", [(1, 5, 7), (1, TRUE_VOCAB, None), (2, 5, 7), (2, 30, None)])
def test_fused_topk_logprobs_match_log_softmax(tp, k, chunk_size):
    """Top-k ids and full-vocab log-probs (padding ids excluded) equal float64 log_softmax + topk;
    the given tokens' log-probs equal log_softmax at those ids."""
    results = (run_distributed(topk_logprobs_on_rank, tp, tp, k, chunk_size) if tp > 1
               else [topk_logprobs_on_rank(1, k, chunk_size)])
    hidden, weight, tokens = head_inputs()
    reference = torch.log_softmax((hidden @ weight.T)[:, :TRUE_VOCAB] / 0.7, -1)
    expected_values, expected_ids = reference.topk(k, dim=-1)
    for logprobs, ids, token_logprobs in results:
        assert ids.dtype == torch.long and ids.max() < TRUE_VOCAB
        assert logprobs.dtype == torch.float32 and token_logprobs.dtype == torch.float32
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(logprobs.double(), expected_values, rtol=1e-6, atol=1e-6)
        expected_tokens = reference.gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(token_logprobs.double(), expected_tokens, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="k=38 is invalid"):
        fused_linear_topk_logprobs(hidden, weight, VOCAB - 2, vocab_size=TRUE_VOCAB)


def test_fused_topk_without_tokens_and_empty_input():
    hidden, weight, _ = head_inputs()
    logprobs, ids, token_logprobs = fused_linear_topk_logprobs(hidden, weight, 4, vocab_size=TRUE_VOCAB)
    assert token_logprobs is None and logprobs.shape == ids.shape == (N, 4)
    logprobs, ids, token_logprobs = fused_linear_topk_logprobs(hidden[:0], weight, 4, token_ids=torch.zeros(0).long())
    assert logprobs.shape == ids.shape == (0, 4) and token_logprobs.shape == (0,)


def sharded_topk_on_rank(tp: int, logits: torch.Tensor, k: int, temperature: float, vocab_size: int):
    rank = tp_rank(tp)
    local = shard(logits, tp, rank)
    return sharded_topk(DenseLogits(local), k, vocab_shard(local.shape[-1], vocab_size, None), temperature,
                        chunk_size=3)


@pytest.mark.parametrize("tp", [1, 2])
def test_sharded_topk_matches_torch_topk(tp):
    """Values `logits / tau` and global ids of the k largest, ranks identical; k > V/tp at TP=2."""
    logits = randn((10, 24), 7)
    k, temperature, vocab_size = 15, 1.5, 21
    results = (run_distributed(sharded_topk_on_rank, tp, tp, logits, k, temperature, vocab_size) if tp > 1
               else [sharded_topk_on_rank(1, logits, k, temperature, vocab_size)])
    expected_values, expected_ids = (logits[:, :vocab_size].double() / temperature).topk(k, dim=-1)
    for values, ids in results:
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(values.double(), expected_values, rtol=1e-6, atol=1e-6)
