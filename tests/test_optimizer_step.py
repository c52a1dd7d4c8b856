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


ADAM = {"optimizer": "adam", "lr": 1e-2, "min_lr": 1e-2, "lr_decay_style": "constant", "weight_decay": 0.1,
        "clip_grad": 0.0}


def adam_steps_on_rank(parallel, steps: int) -> dict:
    """`steps` steps of the trainer's optimizer (`build_optimizer`: Megatron's Adam, torch's fused
    kernel on CPU): each step's full gradients, the weights after, and whether the kernel was fused."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron_opd.config.job import OptimizerConfig
    from megatron_opd.models import build_gpt_model, gather_full_tensors, load_full_state_dict
    from megatron_opd.pipeline import lm_forward_backward
    from megatron_opd.runtime import initialize_runtime
    from megatron_opd.trainer.optim import build_optimizer

    runtime = initialize_runtime(parallel)
    model = build_gpt_model(TIED, runtime)
    load_full_state_dict(model, reference_state_dict(TIED))
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_model = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer, _ = build_optimizer(ddp_model, OptimizerConfig(**ADAM), train_iters=steps)
    fused = [group["fused"] for inner in optimizer.chained_optimizers for group in inner.optimizer.param_groups]
    grads = []
    for step in range(steps):
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        lm_forward_backward(ddp_model, token_batches(TIED, 2, 2, 16, seed=step))
        finalize_model_grads([ddp_model])
        main_grads = gather_full_tensors(ddp_model, lambda param: param.main_grad)
        grads.append({name: grad.clone() for name, grad in main_grads})  # the buffer is zeroed next step
        optimizer.step()
    return {"fused": fused, "grads": grads, "weights": dict(gather_full_tensors(ddp_model))}


def test_adam_steps_match_torch_adamw_in_float64():
    """Three steps of the trainer's Adam against torch's reference AdamW (the per-parameter
    loop) in float64 on the same gradients, Megatron's rule for weight decay (none on 1-D
    parameters). float32 against float64: 2.3e-5 relative to the largest update, the same for
    torch's loop as for the fused kernel (embedding rows with tiny second moments)."""
    (result,) = run_distributed(adam_steps_on_rank, 1, ParallelConfig(), 3)
    assert result["fused"] and all(result["fused"])
    initial = reference_state_dict(TIED)
    params = {name: initial[name].double().clone().requires_grad_() for name in result["weights"]}
    groups = [{"params": [p for p in params.values() if p.dim() > 1], "weight_decay": ADAM["weight_decay"]},
              {"params": [p for p in params.values() if p.dim() == 1], "weight_decay": 0.0}]
    reference = torch.optim.AdamW(groups, lr=ADAM["lr"], betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for grads in result["grads"]:
        for name, param in params.items():
            param.grad = grads[name].double()
        reference.step()
    for name, param in params.items():
        update = result["weights"][name].double() - initial[name].double()
        expected = param.detach() - initial[name].double()
        assert relative_error(update, expected) < 1e-4, name
