"""Runs of the real `Trainer` on gloo ranks, and the comparison of two runs' updates.

Each run builds `Trainer` from key=value overrides exactly as `python -m megatron_opd.train`
does. With plain SGD at lr=1 and no clipping (`SGD`), the weight update is minus the
gradient, so comparing two runs' gradients compares the updates Megatron's schedule, DDP
and the per-token normalization produce.

Used by test_gkd_trainer, test_on_policy, test_opd_rl_trainer and test_server_teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_opd.testing import run_distributed
from tests.gkd_setup import overrides
from tests.hf_models import VOCAB
from tests.tiny_models import relative_error

SGD = {"optimizer.optimizer": "sgd", "optimizer.lr": 1.0, "optimizer.clip_grad": 0.0,
       "optimizer.lr_decay_style": "constant", "optimizer.weight_decay": 0.0,
       "optimizer.use_distributed_optimizer": "null"}
# Two float32 runs of one step at different layouts (another reduction order, TP-split
# matmuls) agree per tensor within ~2e-5 of that tensor's largest gradient (measured: up
# to 2.1e-5 at TP=2, on norm weights, whose gradients sum over every token; each run is
# within 1.5e-5 of HF's float64 gradient). A wrong shard, scale or missing reduction is O(1).
PARITY_RTOL = 5e-5
EXAMPLE_KEYS = ("input_ids", "loss_mask", "prompt_length", "teacher_prompt_ids", "_position")


def train_on_rank(argv: list[str], steps: int, weights: bool = False, evaluate: bool = False,
                  save: bool = False) -> dict:
    """`steps` training steps; each step's metrics and the examples it trained on (this rank's
    share: `EXAMPLE_KEYS`), optionally the full weights before the first step and after the
    last with the last step's full gradients, and a checkpoint at the end when `save`."""
    from megatron_opd.config.job import load_job_config
    from megatron_opd.models import gather_full_tensors
    from megatron_opd.trainer.trainer import Trainer

    trainer = Trainer(load_job_config(None, argv))
    result = {"eval_before": trainer.evaluate() if evaluate else None, "examples": []}
    responses = trainer.algorithm.responses

    def capture(context, iteration):  # what each step trained on, on this rank (samples included)
        out = responses(context, iteration)
        result["examples"].append([{key: example.get(key) for key in EXAMPLE_KEYS} for example in out.examples])
        return out

    trainer.algorithm.responses = capture
    if weights:
        result["initial"] = {name: tensor.clone() for name, tensor in gather_full_tensors(trainer.model)}
    result["steps"] = [trainer.train_step() for _ in range(steps)]
    result["eval_after"] = trainer.evaluate() if evaluate else None
    result["iteration"] = trainer.iteration
    if save:
        trainer.save()
    if weights:
        result["weights"] = {name: tensor.clone() for name, tensor in gather_full_tensors(trainer.model)}
        # The gradient the last optimizer step applied: the buffers are zeroed at the next step only.
        result["grads"] = {name: tensor.clone()
                           for name, tensor in gather_full_tensors(trainer.model, lambda param: param.main_grad)}
    return result


def run(setup: dict, tmp_path: Path, world: int = 1, steps: int = 1, **fields) -> list[dict]:
    argv = overrides(setup, tmp_path / "out", **{**SGD, **fields})
    return run_distributed(train_on_rank, world, argv, steps, weights=True, timeout=300)


def merged(results: list[dict]) -> dict:
    """The last stage's metrics, every stage's weights and gradients, and rank 0's examples
    (the whole batch at DP=1)."""
    combined = {"initial": {}, "weights": {}, "grads": {}}
    for result in results:
        for key in combined:
            combined[key].update(result[key])
    combined["steps"] = next(r["steps"] for r in results if r["steps"][0])
    combined["examples"] = results[0]["examples"]
    return combined


def _real_rows(actual: torch.Tensor, expected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The vocab is padded per TP size: compare the real rows."""
    if actual.shape != expected.shape:
        return actual[:VOCAB], expected[:VOCAB]
    return actual, expected


def update_errors(actual: dict, expected: dict) -> dict[str, float]:
    """Per tensor, the relative error of `actual`'s last update (its gradient at SGD lr=1)
    against `expected`'s: max |a - b| / max |b| (`tests.tiny_models.relative_error`)."""
    assert set(actual["grads"]) == set(expected["grads"]) == set(expected["weights"])
    errors = {}
    for name, grad in expected["grads"].items():
        assert torch.equal(*_real_rows(actual["initial"][name], expected["initial"][name])), \
            f"{name}: the runs did not start from the same weights"
        errors[name] = relative_error(*_real_rows(actual["grads"][name], grad))
    return errors


def assert_same_update(actual: dict, expected: dict, tolerance: float) -> None:
    """Every tensor's update (its gradient) equal within `tolerance` relative to that tensor's
    largest gradient, and every updated weight within `tolerance` of the other's."""
    errors = update_errors(actual, expected)
    worst = max(errors, key=errors.get)
    assert errors[worst] < tolerance, f"{worst}: update differs by {errors[worst]:.3g} (relative)"
    for name, weight in expected["weights"].items():
        error = relative_error(*_real_rows(actual["weights"][name], weight))
        assert error < tolerance, f"{name}: weight differs by {error:.3g} (relative)"
