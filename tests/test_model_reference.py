"""Megatron GPTModel built by `build_gpt_model` computes the architecture it claims.

Megatron in float32 at TP=1 against the float64 dense reference of
`tests.dense_reference` (no Megatron code) from the same weights: logits, loss, and
the gradient of every weight.
"""

import pytest
import torch

from megatron_opd.config import ParallelConfig
from megatron_opd.testing import run_distributed
from tests.dense_reference import dense_loss_and_grads
from tests.tiny_models import (
    GQA_QKNORM,
    TIED,
    merge_ranks,
    reference_state_dict,
    relative_error,
    scaled_diff,
    token_batches,
    train_step_on_rank,
)


@pytest.mark.parametrize("config", [GQA_QKNORM, TIED], ids=["gqa_qknorm", "tied"])
def test_megatron_matches_dense_float64_reference(config):
    state = reference_state_dict(config)
    tokens = token_batches(config, 2, 2, 16)
    megatron = merge_ranks(run_distributed(train_step_on_rank, 1, config, ParallelConfig(), state, tokens))
    logits, losses, grads = dense_loss_and_grads(config, state, tokens)

    assert relative_error(megatron["logits"], logits) < 2e-5
    assert relative_error(megatron["losses"], losses) < 2e-6
    assert set(megatron["grads"]) == set(grads)
    for name, grad in grads.items():
        assert relative_error(megatron["grads"][name], grad) < 2e-5, name


def test_dense_reference_notices_a_layout_change():
    """The reference must disagree with Megatron when the QKV layout is read another way
    (q, k, v blocks instead of per-group interleave): proof that the check above bites."""
    config = GQA_QKNORM
    state = reference_state_dict(config)
    tokens = token_batches(config, 1, 2, 16)
    megatron = merge_ranks(run_distributed(train_step_on_rank, 1, config, ParallelConfig(), state, tokens))
    d, groups = config.head_dim, config.query_groups
    q_rows = config.num_attention_heads * d
    permuted = dict(state)
    for name in [n for n in state if n.endswith("linear_qkv.weight")]:
        per_group = state[name].view(groups, -1, d, state[name].shape[-1])
        q_blocks = per_group[:, :-2].reshape(q_rows, -1)
        k_blocks, v_blocks = per_group[:, -2].reshape(-1, q_blocks.shape[-1]), per_group[:, -1].reshape(-1, q_blocks.shape[-1])
        permuted[name] = torch.cat([q_blocks, k_blocks, v_blocks])
    logits, _, _ = dense_loss_and_grads(config, permuted, tokens)
    assert scaled_diff(megatron["logits"], logits) > 1e-2
