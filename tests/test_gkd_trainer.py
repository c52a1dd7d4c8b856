"""Off-policy GKD through the real trainer on gloo ranks.

Each run builds `Trainer` from key=value overrides exactly as `python -m megatron_opd.train`
does (`tests.helpers.trainer_runs`). With plain SGD at lr=1 and no clipping, the weight
update is minus the gradient, so comparing each tensor's update across batch splits and
parallel layouts, relative to its own scale, compares the gradients Megatron's schedule,
DDP and the per-token normalization produce.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_opd.testing import run_distributed
from tests.gkd_setup import make_gkd_setup, overrides
from tests.helpers.trainer_runs import PARITY_RTOL, SGD, assert_same_update, merged, run, train_on_rank


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return make_gkd_setup(tmp_path_factory.mktemp("gkd"))


def test_gradient_accumulation_invariance(setup, tmp_path):
    """One microbatch of 8, four of 2, and DP=2 x two of 2: sequences of unequal length,
    normalized by the global batch's token count, give one gradient."""
    reference = merged(run(setup, tmp_path / "a", **{"training.micro_batch_size": 8}))
    four = merged(run(setup, tmp_path / "b", **{"training.micro_batch_size": 2}))
    data_parallel = merged(run(setup, tmp_path / "c", world=2, **{"training.micro_batch_size": 2}))
    lengths = reference["steps"][0]["tokens"]
    assert lengths > 8
    for other in (four, data_parallel):
        assert other["steps"][0]["tokens"] == lengths
        assert abs(other["steps"][0]["loss"] - reference["steps"][0]["loss"]) < 1e-6
        assert_same_update(other, reference, 1e-5)  # no TP split: measured 1.2e-6


def test_mean_of_microbatch_means_would_differ(setup, tmp_path):
    """Control: the batches above must make per-microbatch normalization visible, or the
    invariance test could not fail. Their microbatches count different token numbers."""
    from megatron_opd.config.job import load_job_config
    from megatron_opd.data import DataIterator, build_dataset, collate
    from transformers import AutoTokenizer

    config = load_job_config(None, overrides(setup, tmp_path, **{"training.micro_batch_size": 2}), world_size=1)
    tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer)
    dataset, _ = build_dataset(config.data, tokenizer)
    indices = next(DataIterator(dataset, 8, seed=config.data.seed))
    mask = collate([dataset[i] for i in indices], 0)["loss_mask"]
    counts = mask.view(4, 2, -1).sum(dim=(1, 2))
    assert len(set(counts.tolist())) > 1, counts


@pytest.mark.parametrize("topk", [None, 5], ids=["full_vocab", "top5"])
def test_one_step_same_at_every_layout(setup, tmp_path, topk):
    """TP=2, PP=2 and TP=2 + SP reproduce TP=1's loss and updated weights (fp32, 1e-5)."""
    fields = {"training.micro_batch_size": 2, "gkd_logits_topk": "null" if topk is None else topk}
    reference = merged(run(setup, tmp_path / "tp1", **fields))
    layouts = {
        "tp2": {"parallel.tensor_model_parallel_size": 2},
        "pp2": {"parallel.pipeline_model_parallel_size": 2},
        "tp2_sp": {"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True},
    }
    for name, layout in layouts.items():
        other = merged(run(setup, tmp_path / name, world=2, **fields, **layout))
        assert abs(other["steps"][0]["loss"] - reference["steps"][0]["loss"]) < 1e-5, name
        assert_same_update(other, reference, PARITY_RTOL)


def test_teacher_equal_to_student_gives_zero_loss(setup, tmp_path):
    argv = overrides(setup, tmp_path / "out", **{**SGD, "teacher_model": setup["student"], "beta": 0.0})
    (result,) = run_distributed(train_on_rank, 1, argv, 1)
    assert abs(result["steps"][0]["loss"]) < 1e-6 and result["steps"][0]["grad_norm"] < 1e-5


def test_training_lowers_held_out_divergence(setup, tmp_path):
    argv = overrides(setup, tmp_path / "out", **{"optimizer.lr": 1e-2, "optimizer.optimizer": "adam",
                                                  "training.micro_batch_size": 4})
    (result,) = run_distributed(train_on_rank, 1, argv, 20, evaluate=True, timeout=300)
    before, after = result["eval_before"]["divergence"], result["eval_after"]["divergence"]
    assert after < 0.9 * before, (before, after)  # JSD(0.5) <= ln 2: random models start near it


@pytest.mark.parametrize("lmbda", [0.0, 0.5])
def test_resume_continues_exactly(setup, tmp_path, lmbda):
    """Stop after 2 steps (checkpoint), resume: steps 3..5 equal an uninterrupted run,
    LR schedule included; with lmbda=0.5 also the on-policy decisions and samples."""
    fields = {"optimizer.optimizer": "adam", "optimizer.lr": 1e-3, "training.micro_batch_size": 4,
              "optimizer.lr_warmup_iters": 2, "optimizer.lr_decay_style": "cosine", "training.train_iters": 5,
              "lmbda": lmbda, "max_completion_length": 5, "temperature": 1.5}
    (straight,) = run_distributed(train_on_rank, 1, overrides(setup, tmp_path / "straight", **fields), 5)
    interrupted = overrides(setup, tmp_path / "resumed", **fields)
    run_distributed(train_on_rank, 1, interrupted, 2, save=True)
    (resumed,) = run_distributed(train_on_rank, 1, interrupted, 3)
    assert resumed["iteration"] == 5
    for expected, actual in zip(straight["steps"][2:], resumed["steps"]):
        assert abs(expected["loss"] - actual["loss"]) < 1e-6 and expected["lr"] == actual["lr"], (expected, actual)
        assert expected.get("sample_length") == actual.get("sample_length")
    if lmbda:
        assert {step["on_policy"] for step in straight["steps"][2:]} == {0.0, 1.0}, "no mix of step kinds to resume"


@pytest.mark.slow  # ~14 s; faster: test_convert.py::test_killed_conversion_leaves_no_checkpoint (the same
# atomic_output_dir under SIGKILL), test_resume_continues_exactly (resume from a checkpoint)
def test_killed_save_leaves_previous_checkpoint(setup, tmp_path):
    """SIGKILL `python -m megatron_opd.train` while it writes a checkpoint (the first one
    seen being written after iteration 2): the one before stays the latest, loads, and a
    new run resumes from it. Saves come every 2 steps, so a missed window means the next."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from megatron_opd.trainer.checkpointing import latest_checkpoint

    out = tmp_path / "out"
    argv = overrides(setup, out, **{"training.micro_batch_size": 4, "training.train_iters": 40,
                                    "training.save_interval": 2})
    process = subprocess.Popen([sys.executable, "-m", "megatron_opd.train", *argv],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "MEGATRON_OPD_DEVICE": "cpu"}, cwd=Path(__file__).parents[1],
                               start_new_session=True)
    killed_at = None
    while killed_at is None:  # ends: the run stops by itself after 40 steps, and fails the assert
        assert process.poll() is None, "training ended before it could be killed"
        for staging in (out / "checkpoints").glob(".iter_*.partial-*/hf"):
            iteration = int(re.search(r"iter_(\d+)", str(staging)).group(1))
            # Kill only while the dist-checkpoint is still being written, far from the rename.
            if iteration >= 4 and not (staging.parent / "dist" / ".metadata").exists():
                os.killpg(process.pid, signal.SIGKILL)  # with its children (dist-checkpointing's Manager)
                killed_at = iteration
                break
        time.sleep(0.005)
    process.wait()
    assert killed_at is not None, "no checkpoint write was seen"
    assert latest_checkpoint(out).name == f"iter_{killed_at - 2:07d}"
    assert not (out / "checkpoints" / f"iter_{killed_at:07d}").exists()
    (resumed,) = run_distributed(train_on_rank, 1, argv, 1)
    assert resumed["iteration"] == killed_at - 1


def test_distributed_optimizer_default_is_adam_at_data_parallel():
    """As Megatron-LM's recommended setting: on for Adam at DP > 1, where sharding the fp32
    main params and Adam state saves memory, with torch's Adam as with TE's or Apex's (its
    checkpoints resume exactly: test_resume_layouts.py); off at DP=1 (nothing to shard) and
    for SGD. An explicit setting is kept (`true` with SGD is refused by the config)."""
    from megatron_opd.trainer.optim import resolve_distributed_optimizer

    assert resolve_distributed_optimizer(None, "adam", 2) is True
    assert resolve_distributed_optimizer(None, "adam", 1) is False
    assert resolve_distributed_optimizer(None, "sgd", 2) is False
    assert resolve_distributed_optimizer(False, "adam", 2) is False
    assert resolve_distributed_optimizer(True, "adam", 1) is True


def test_contradicting_settings_are_refused(setup, tmp_path):
    """Settings that contradict each other (GKD without any teacher too) are refused at load."""
    from megatron_opd.config import ConfigError
    from megatron_opd.config.job import load_job_config

    server = {"teacher_model": "null", "teacher_model_server": "http://h:1", "gkd_logits_topk": 4}
    with pytest.raises(ConfigError, match="teacher_model=None is invalid: GKD needs a teacher"):
        load_job_config(None, overrides(setup, tmp_path, teacher_model="null"), world_size=1)
    for fields, name in (({**server, "seq_kd": True}, "seq_kd=True is invalid"),
                         ({"algorithm": "sft"}, "teacher_model=.* is invalid: .*null with algorithm: sft"),
                         ({"algorithm": "sft", "teacher_model": "null", "seq_kd": True}, "seq_kd=True is invalid"),
                         ({"top_k": 0}, "top_k=0 is invalid")):
        with pytest.raises(ConfigError, match=name):
            load_job_config(None, overrides(setup, tmp_path, **fields), world_size=1)
