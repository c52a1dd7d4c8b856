"""Resume a training checkpoint at its own layout and at another one (TP, PP, DP, either optimizer).

Every run is the real `Trainer` on 2 gloo ranks (`tests.helpers.trainer_runs.train_on_rank`):
4 Adam steps uninterrupted (the reference), or 2 steps, a checkpoint, and the last 2 steps
in a new process, at the same or another layout. At DP=2 the DistributedOptimizer is on
(the default for Adam at DP > 1) unless a layout says `plain`. The reference is always the
uninterrupted run at the layout that saved: the checkpoint must carry it on.

Same layout: the resumed steps equal the reference's to 1e-6, as in the 1-rank
test_gkd_trainer.py::test_resume_continues_exactly (measured: equal to the last bit).
Another layout computes the same steps with other float32 reduction orders (TP-split
matmuls, sums over other DP shards), so its losses move by rounding only (measured: at
most 5.3e-8); `LAYOUT_TOLERANCE` is 1e-6. A lost or misplaced optimizer state moves the
fourth step's loss by 1e-4 or more (measured, each break made on purpose: Adam state
zeroed 1.4e-3, step count reset 1.0e-3, DistributedOptimizer shards misplaced 1.1e-3, one
step tensor shared by all parameters 1.4e-4 to 3.5e-4, bf16 master weights not restored 2.3e-3).
bf16 is compared where only the optimizer changes (DP=2 both ways, exact): across TP its
rounding alone moves the losses by ~1e-4.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from megatron_opd.testing import run_distributed
from tests.gkd_setup import make_gkd_setup, overrides
from tests.hf_models import make_hf_model
from tests.helpers.trainer_runs import train_on_rank

STEPS, SAVED_AT = 4, 2
EXACT = 1e-6
LAYOUT_TOLERANCE = 1e-6
ADAM = {"optimizer.optimizer": "adam", "optimizer.lr": 1e-2, "optimizer.lr_warmup_iters": 1,
        "optimizer.lr_decay_style": "cosine", "optimizer.weight_decay": 0.01, "optimizer.clip_grad": 1.0,
        "training.micro_batch_size": 2, "training.train_iters": STEPS}
LAYOUTS = {
    "tp2": {"parallel.tensor_model_parallel_size": 2},
    "pp2": {"parallel.pipeline_model_parallel_size": 2},
    "dp2": {},  # 2 ranks, no model parallelism: DP=2, the DistributedOptimizer by default
    "dp2_plain": {"optimizer.use_distributed_optimizer": False},
    # bf16: the optimizers' fp32 master weights are state of their own ('fp32_param')
    "dp2_bf16": {"training.precision": "bf16"},
    "dp2_plain_bf16": {"optimizer.use_distributed_optimizer": False, "training.precision": "bf16"},
}


class Runs:
    """Runs shared by the tests of this module, each made once: the uninterrupted run and the
    first half (ending in a checkpoint) at a layout."""

    def __init__(self, root: Path):
        self.root = root
        self.setup = make_gkd_setup(root / "setup")
        self._straight: dict[str, list[dict]] = {}
        self._saved: dict[str, Path] = {}

    def argv(self, output_dir: Path, layout: str, **fields) -> list[str]:
        return overrides(self.setup, output_dir, **{**ADAM, **LAYOUTS[layout], **fields})

    def straight(self, layout: str) -> list[dict]:
        if layout not in self._straight:
            argv = self.argv(self.root / f"straight_{layout}", layout)
            self._straight[layout] = run_distributed(train_on_rank, 2, argv, STEPS, timeout=300)
        return self._straight[layout]

    def saved(self, layout: str) -> Path:
        """An output dir whose latest checkpoint is the one after step `SAVED_AT` at `layout`."""
        if layout not in self._saved:
            out = self.root / f"saved_{layout}"
            run_distributed(train_on_rank, 2, self.argv(out, layout), SAVED_AT, save=True, timeout=300)
            self._saved[layout] = out
        return self._saved[layout]

    def resume(self, source: str, target: str) -> list[dict]:
        """The last steps at `target`, in a copy of `source`'s output dir (each resume starts from it)."""
        out = self.root / f"resumed_{source}_to_{target}"
        shutil.copytree(self.saved(source), out)
        return run_distributed(train_on_rank, 2, self.argv(out, target), STEPS - SAVED_AT, timeout=300)


def optimizer_on_rank(argv: list[str]) -> dict:
    """The optimizer the trainer builds, and the bytes of Adam state this rank holds after a step."""
    import torch

    from megatron_opd.config.job import load_job_config
    from megatron_opd.trainer.trainer import Trainer

    trainer = Trainer(load_job_config(None, argv))
    trainer.train_step()
    leaves = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    state = [value for leaf in leaves for per_param in leaf.optimizer.state.values() for value in per_param.values()]
    return {"kinds": {type(leaf).__name__ for leaf in leaves},
            "state_bytes": sum(value.numel() * value.element_size() for value in state
                               if torch.is_tensor(value) and value.dim() > 0),
            "params": sum(param.numel() for param in trainer.model.parameters())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("resume_layouts"))


def last_stage_steps(results: list[dict]) -> list[dict]:
    """The metrics of each step (the last pipeline stage reports them)."""
    return next(result["steps"] for result in results if result["steps"][0])


def trained_examples(results: list[dict]) -> list[set]:
    """Per step, the examples trained on by all ranks together (TP/PP ranks share theirs)."""
    steps = zip(*(result["examples"] for result in results))
    return [{(example["_position"], tuple(example["input_ids"])) for rank in step for example in rank}
            for step in steps]


def assert_continues(resumed: list[dict], straight: list[dict], tolerance: float) -> None:
    """The resumed steps are the uninterrupted run's last steps: loss, LR, and the same examples."""
    expected, actual = last_stage_steps(straight)[SAVED_AT:], last_stage_steps(resumed)
    assert [r["iteration"] for r in resumed] == [STEPS] * len(resumed)
    for step, (want, got) in enumerate(zip(expected, actual), start=SAVED_AT + 1):
        assert abs(want["loss"] - got["loss"]) < tolerance, (step, want["loss"], got["loss"])
        assert want["lr"] == got["lr"], (step, want["lr"], got["lr"])
    # The data continues where it stopped (control: the steps before trained on other examples).
    assert trained_examples(resumed) == trained_examples(straight)[SAVED_AT:]
    assert trained_examples(straight)[:SAVED_AT] != trained_examples(straight)[SAVED_AT:]


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_resume_at_the_same_layout_is_exact(runs, layout):
    """TP=2 (plain optimizer) and DP=2 (DistributedOptimizer over torch's Adam) resume exactly."""
    assert_continues(runs.resume(layout, layout), runs.straight(layout), EXACT)


@pytest.mark.slow  # ~40 s after the tests above (runs shared), ~50 s alone (`make test-slow`): 2-rank runs
@pytest.mark.parametrize("source,target", [("tp2", "dp2_plain"), ("tp2", "pp2"), ("tp2", "dp2"), ("dp2", "tp2"),
                                                  ("dp2_bf16", "dp2_plain_bf16")])
def test_resume_onto_another_layout(runs, source, target):
    """Model and optimizer state resharded by dist-checkpointing, from the plain optimizer into
    the DistributedOptimizer and back: the loss continues within float32 rounding of the
    uninterrupted run at the source layout, on the same examples."""
    assert_continues(runs.resume(source, target), runs.straight(source), LAYOUT_TOLERANCE)


def test_distributed_optimizer_is_the_default_at_dp2_and_shards_adam(runs, tmp_path):
    """Adam at DP=2 with `use_distributed_optimizer` unset: Megatron's DistributedOptimizer over
    torch's Adam, each rank holding about half of exp_avg + exp_avg_sq (8 bytes a parameter)."""
    ranks = run_distributed(optimizer_on_rank, 2, runs.argv(tmp_path / "out", "dp2", **{"training.train_iters": 1}))
    full = 8 * ranks[0]["params"]
    assert all(rank["kinds"] == {"DistributedOptimizer"} for rank in ranks), ranks
    assert sum(rank["state_bytes"] for rank in ranks) == full
    assert all(rank["state_bytes"] < 0.51 * full for rank in ranks), (ranks, full)


def test_checkpoint_of_another_model_shape_is_refused(runs, tmp_path):
    """`python -m megatron_opd.train` resuming the TP=2 checkpoint with a student of another
    FFN width: one line naming the tensor and both shapes, no traceback."""
    import os
    import subprocess
    import sys

    other = make_hf_model("qwen2", tmp_path / "wider", seed=1, intermediate_size=128)
    out = tmp_path / "out"
    shutil.copytree(runs.saved("tp2"), out)
    argv = runs.argv(out, "dp2_plain", model=other, **{"training.resume_allow_changes": "[model]"})
    process = subprocess.run([sys.executable, "-m", "megatron_opd.train", *argv],
                             capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
                             env={**os.environ, "MEGATRON_OPD_DEVICE": "cpu"})
    assert process.returncode == 1, process.stderr[-3000:]
    assert "Traceback" not in process.stderr, process.stderr[-3000:]
    assert ("tensor 'decoder.layers.mlp.linear_fc1.weight' has shape (4, 192, 64) in the checkpoint "
            "and (4, 256, 64) in this model") in process.stderr.splitlines()[-1], process.stderr[-3000:]
