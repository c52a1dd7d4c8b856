"""The OPD-RL and OPSD CPU demos end to end at toy size on two gloo ranks.

What `make demo-opd-rl` / `make demo-opsd` run, shrunk to a few steps: the warm-up at
TP=1 x DP=2, the method at TP=2, before/after measurements and `metrics.json`. The
numbers of the real runs are in the closing note; here their presence, ranges, the OPSD
data and the exit code's agreement with the metrics are checked.
"""

from __future__ import annotations

import json
import math

import pytest

from megatron_opd.quickstart.demos import METRIC_KEYS, hinted
from megatron_opd.quickstart.run import SHIPPED_TEACHER
from megatron_opd.testing import run_distributed


def demo_on_rank(argv: list[str]) -> int:
    from megatron_opd.quickstart.demos import main

    return main(argv)


@pytest.mark.parametrize("method", ["opd_rl", "opsd"])
def test_demo_runs_every_stage(tmp_path, method):
    if method == "opd_rl" and not (SHIPPED_TEACHER / "model.safetensors").is_file():
        pytest.skip("the shipped quickstart teacher is not in this checkout")
    out = tmp_path / method
    argv = ["--method", method, "--out", str(out), "--train-rows", "256", "--val-rows", "32",
            "--student-size", "32,1,2,2,64", "--student-warmup-iters", "4", "training.train_iters=2",
            "training.global_batch_size=16", "training.micro_batch_size=16", "training.eval_iters=2",
            "training.log_interval=1"]
    codes = run_distributed(demo_on_rank, 2, argv, timeout=600)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert math.isfinite(metrics[key]), key
    assert metrics["teacher_kl_before"] > 0 and metrics["teacher_kl_after"] > 0
    improved = (metrics["teacher_kl_after"] < metrics["teacher_kl_before"]
                and metrics["student_accuracy_after"] > metrics["student_accuracy_before"])
    assert codes == [0 if improved else 1] * 2
    if method == "opsd":
        row = json.loads((out / "data_opsd" / "train.jsonl").read_text().splitlines()[0])
        assert row["teacher_prompt"].endswith("=" + row["prompt"])
        assert row["teacher_prompt"].startswith(row["completion"] + "=")


def test_hinted_prompt_holds_the_answer():
    assert hinted({"prompt": "74+583=", "completion": "234"}, little_endian=True)["teacher_prompt"] == "234=74+583="
    assert hinted({"prompt": "47+385=", "completion": "432"}, little_endian=False)["teacher_prompt"] == "432=47+385="
