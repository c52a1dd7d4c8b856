"""Resume a MoE student's training checkpoint at EP=2 (exact) and onto EP=1 (within rounding).

The real `Trainer` (`tests.helpers.trainer_runs.train_on_rank`), 4 Adam steps uninterrupted
at EP=2 on 2 ranks (experts split, the rest DP=2 with the DistributedOptimizer), or 2
steps, a checkpoint, and the last 2 steps in new processes. The expert weights and their
Adam state are saved per expert (Megatron's sharded state dict) and load at any EP size.
"""

from __future__ import annotations

import shutil

from megatron_opd.testing import run_distributed
from tests.gkd_setup import overrides
from tests.helpers.trainer_runs import train_on_rank
from tests.test_moe_training import moe_setup

ADAM = {"optimizer.optimizer": "adam", "optimizer.lr": 1e-2, "optimizer.lr_warmup_iters": 1,
        "optimizer.lr_decay_style": "cosine", "optimizer.weight_decay": 0.01, "optimizer.clip_grad": 1.0,
        "training.micro_batch_size": 2, "training.train_iters": 4}
EP2 = {"parallel.expert_model_parallel_size": 2}
EXACT, OTHER_LAYOUT = 1e-6, 1e-5


def test_resume_at_ep2_and_onto_ep1(tmp_path):
    setup = moe_setup(tmp_path / "setup", "qwen3_moe", "llama2")
    straight = run_distributed(train_on_rank, 2, overrides(setup, tmp_path / "straight", **ADAM, **EP2), 4,
                               timeout=300)
    reference = next(r["steps"] for r in straight if r["steps"][0])
    interrupted = overrides(setup, tmp_path / "resumed", **ADAM, **EP2)
    run_distributed(train_on_rank, 2, interrupted, 2, save=True, timeout=300)
    shutil.copytree(tmp_path / "resumed", tmp_path / "onto_ep1")
    resumed = run_distributed(train_on_rank, 2, interrupted, 2, timeout=300)
    steps = next(r["steps"] for r in resumed if r["steps"][0])
    assert resumed[0]["iteration"] == 4
    for expected, actual in zip(reference[2:], steps):
        assert abs(expected["loss"] - actual["loss"]) < EXACT, (expected, actual)
        assert abs(expected["moe_aux_loss"] - actual["moe_aux_loss"]) < EXACT
    onto = overrides(setup, tmp_path / "onto_ep1", **ADAM, **{"parallel.expert_model_parallel_size": 1})
    (single,) = run_distributed(train_on_rank, 1, onto, 2, timeout=300)
    assert single["iteration"] == 4
    for expected, actual in zip(reference[2:], single["steps"]):
        assert abs(expected["loss"] - actual["loss"]) < OTHER_LAYOUT, (expected, actual)
