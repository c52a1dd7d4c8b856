"""The optimizer step's numbers through the trainer: the LR schedule and gradient clipping.

LR: each step's `lr` metric and the lr the step's SGD update actually applied (the update
over the gradient it used) against Megatron-Core's `OptimizerParamScheduler` convention,
written out here: the scheduler starts at step count n = 0 and is stepped once after
each optimizer step, so optimizer step k (1-based) runs at f(k - 1) and reports f(k),
the lr of the next step, as Megatron-LM logs it. With W warmup steps and
D = max(train_iters, W + 1) decay steps:

    n <= W (W > 0):  lr * n / W                    (linear warmup from 0)
    constant:        lr
    n > D:           min_lr
    else, p = (n - W) / (D - W):
        linear:      min_lr + (lr - min_lr) * (1 - p)
        cosine:      min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * p))

Clipping: with optimizer.clip_grad = c below the gradient's global norm, SGD at lr=1
moves the weights by -g * c / ||g||, g the unclipped gradient computed by HF
transformers in float64 (`tests.kd_hf_reference`), and reports ||g||.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_opd.testing import run_distributed
from tests.gkd_setup import make_gkd_setup, overrides
from tests.kd_hf_reference import assert_update_is, run_trainer_jobs, step_reference

SGD = {"optimizer.optimizer": "sgd", "optimizer.clip_grad": 0.0, "optimizer.weight_decay": 0.0,
       "optimizer.use_distributed_optimizer": "null", "data.shuffle": "false"}
LR, MIN_LR, TRAIN_ITERS = 0.1, 0.02, 6
SCHEDULES = {"linear": ("linear", 2), "cosine": ("cosine", 2), "constant": ("constant", 2),
             "cosine_no_warmup": ("cosine", 0)}
CLIP = 0.05


def megatron_lr(n: int, style: str, warmup: int) -> float:
    decay_steps = max(TRAIN_ITERS, warmup + 1)
    if warmup > 0 and n <= warmup:
        return LR * n / warmup
    if style == "constant":
        return LR
    if n > decay_steps:
        return MIN_LR
    progress = (n - warmup) / (decay_steps - warmup)
    if style == "linear":
        return MIN_LR + (LR - MIN_LR) * (1 - progress)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return make_gkd_setup(tmp_path_factory.mktemp("schedule"))


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("runs")
    jobs = {}
    for name, (style, warmup) in SCHEDULES.items():
        # SFT: no teacher, a cheap step; the schedule does not depend on the algorithm
        fields = {**SGD, "algorithm": "sft", "teacher_model": "null", "optimizer.lr": LR, "optimizer.min_lr": MIN_LR,
                  "optimizer.lr_decay_style": style, "optimizer.lr_warmup_iters": warmup,
                  "training.train_iters": TRAIN_ITERS, "training.micro_batch_size": 2,
                  "training.global_batch_size": 2}
        jobs[name] = {"argv": overrides(setup, out / name, **fields), "steps": TRAIN_ITERS}
    jobs["clip"] = {"argv": overrides(setup, out / "clip", **{**SGD, "optimizer.lr": 1.0, "optimizer.clip_grad": CLIP,
                                                              "optimizer.lr_decay_style": "constant",
                                                              "training.micro_batch_size": 4,
                                                              "training.train_iters": 1}),
                    "steps": 1}
    results = run_distributed(run_trainer_jobs, 1, list(jobs.values()), timeout=600)[0]
    return dict(zip(jobs, results))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_lr_schedule_follows_megatrons_formula(runs, name):
    style, warmup = SCHEDULES[name]
    steps = runs[name]["steps"]
    assert len(steps) == TRAIN_ITERS
    for k, step in enumerate(steps, start=1):
        assert step["metrics"]["lr"] == pytest.approx(megatron_lr(k, style, warmup), rel=1e-9, abs=1e-12), k
        assert step["applied_lr"] == pytest.approx(megatron_lr(k - 1, style, warmup), rel=1e-5, abs=1e-9), k
    if warmup:
        assert steps[0]["applied_lr"] == pytest.approx(0, abs=1e-9), "Megatron's warmup starts at lr 0"
    if style != "constant":
        assert steps[-1]["metrics"]["lr"] == pytest.approx(MIN_LR), "the schedule ends at min_lr"


def test_clip_grad_scales_the_update_to_the_clip_norm(setup, runs):
    result = runs["clip"]
    step = result["steps"][0]
    reference = step_reference(setup["student"], setup["teacher"], step["examples"], beta=0.5, temperature=1.0)
    assert CLIP < 0.5 * reference.grad_norm, "the clip must be active for the test to mean anything"
    # the reported norm is the unclipped gradient's
    assert step["metrics"]["grad_norm"] == pytest.approx(reference.grad_norm, rel=1e-4)
    scale = min(1.0, CLIP / reference.grad_norm)
    assert_update_is(result, reference.grads, scale=scale, atol=1e-6)
    # the whole update (every weight, fused ones included) has norm clip_grad
    update = torch.cat([(result["weights_after"][name] - result["weights_before"][name]).double().flatten()
                        for name in result["weights_before"]])
    assert update.norm().item() == pytest.approx(CLIP, rel=1e-3)
