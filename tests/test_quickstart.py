"""The quickstart driver end to end at toy size (a few steps per stage) on two gloo ranks.

What `make quickstart` runs, shrunk: the teacher's SFT at TP=1 x DP=2, then GKD at TP=2
with lmbda=0.5 (on-policy steps included), the SFT baseline, and `metrics.json`. The
numbers of the real run are in the closing note; here only their presence, ranges and
the exit code's agreement with them are checked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_opd.testing import run_distributed

KEYS = ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "student_kl_before",
        "student_kl_after", "sft_baseline_accuracy")


def quickstart_on_rank(argv: list[str]) -> int:
    from megatron_opd.quickstart.run import main

    return main(argv)


def test_quickstart_runs_every_stage(tmp_path):
    out = tmp_path / "quickstart"
    argv = ["--out", str(out), "--teacher", "train", "--teacher-iters", "6", "--teacher-batch", "16", "--train-rows", "256", "--val-rows", "32",
            "--teacher-size", "32,2,2,2,64", "--student-size", "32,1,2,2,64", "training.train_iters=8",
            "training.global_batch_size=16", "training.micro_batch_size=8", "training.eval_iters=2",
            "training.log_interval=1"]
    codes = run_distributed(quickstart_on_rank, 2, argv, timeout=600)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in KEYS:
        assert math.isfinite(metrics[key]), key
    for key in KEYS:
        if "accuracy" in key:
            assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["student_kl_before"] > 0 and metrics["student_kl_after"] > 0
    improved = metrics["student_accuracy_after"] > metrics["student_accuracy_before"]
    assert codes == [0 if improved else 1] * 2
    steps = [json.loads(line) for line in (Path(out) / "gkd" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [step for step in steps if "on_policy" in step]
    assert len(train_steps) == 8 and {step["on_policy"] for step in train_steps} == {0.0, 1.0}
    assert (out / "teacher" / "checkpoints" / "iter_0000006").is_dir()


def test_shipped_teacher_is_small_and_loadable():
    """What `--teacher auto` uses: under 5 MB, an HF Llama our converter accepts, made for
    the task the quickstart runs by default."""
    import pytest

    from megatron_opd.models.hf_config import model_config_from_hf
    from megatron_opd.quickstart.run import SHIPPED_TEACHER, parse_args, shipped_teacher_matches

    if not (SHIPPED_TEACHER / "task.json").is_file():
        pytest.skip("no shipped teacher (tools/make_quickstart_teacher.py makes one)")
    assert sum(path.stat().st_size for path in SHIPPED_TEACHER.iterdir()) < 5 * 2**20
    config = model_config_from_hf(SHIPPED_TEACHER)
    assert config.num_layers == 4 and config.hidden_size == 128
    assert shipped_teacher_matches(parse_args([]))
    assert not shipped_teacher_matches(parse_args(["--max-digits", "3"]))
