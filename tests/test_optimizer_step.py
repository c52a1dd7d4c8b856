"""Megatron's optimizer runs in CPU mode and clips by the true global grad norm at any layout.

One SGD step with gradient clipping, at TP=1, TP=2 and TP=2 x PP=2, against the same
step computed densely in float64: the norm is over the full model (each TP shard and
each stage counted once, tied embeddings once), and the update is linear in it.
"""

import functools

import pytest
import torch

from megatron_opd.config import ParallelConfig
from megatron_opd.testing import run_distributed
from tests.dense_reference import dense_loss_and_grads
from tests.tiny_models import TIED, reference_state_dict, relative_error, token_batches, train_step_on_rank

LR, CLIP = 0.5, 0.25
RTOL_UPDATE = 1e-5


@functools.lru_cache(maxsize=None)
def dense_step():
    state, tokens = reference_state_dict(TIED), token_batches(TIED, 2, 2, 16)
    _, _, grads = dense_loss_and_grads(TIED, state, tokens)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
    scale = min(1.0, CLIP / (norm.item() + 1e-6))  # Megatron's clip_grad_norm rule
    return norm.item(), {name: state[name].double() - LR * scale * g for name, g in grads.items()}


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2)])
def test_sgd_step_with_clipping_matches_dense(tp, pp):
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    results = run_distributed(train_step_on_rank, tp * pp, TIED, parallel, reference_state_dict(TIED),
                              token_batches(TIED, 2, 2, 16), sgd_step={"lr": LR, "clip_grad": CLIP})
    norm, expected = dense_step()
    assert norm > 4 * CLIP  # clipping is active, so a wrong norm changes every update
    for result in results:
        assert abs(result["grad_norm"] - norm) / norm < 1e-5
    weights = {}
    for result in results:
        weights.update(result["weights"])
    assert set(weights) == set(expected)
    initial = reference_state_dict(TIED)
    for name, weight in expected.items():
        assert relative_error(weights[name], weight) < 2e-6, name
        # The update itself, relative to its own size: updates are ~1e-4 of the weights, so
        # the weights alone would hide a 1% error in them. Measured as new - old weights, an
        # update carries the float32 rounding of the new weight (half an ulp, <= eps |w| / 2).
        update, expected_update = weights[name].double() - initial[name].double(), weight - initial[name].double()
        slack = RTOL_UPDATE * expected_update.abs().max() + torch.finfo(torch.float32).eps * weight.abs()
        excess = ((update - expected_update).abs() / slack).max().item()
        assert excess <= 1, f"{name}: update off by {excess:.3g} x its tolerance"
