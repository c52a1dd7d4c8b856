"""Resume compares the new config and the files it reads with the checkpoint's.

Applied with a line: the run's length and LR schedule (the schedule re-derived at the
checkpoint's step, checked against Megatron's cosine formula written out here), the
intervals, the layout. Refused naming the field: another model of the same shape, the same
path with other weights, other data of the same length, another tokenizer, an algorithm
parameter, `resume: false` over a checkpoint; `training.resume_allow_changes` applies them.
Also: `save_total_limit`, and metrics (JSONL and TensorBoard) without duplicated steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_opd.testing import run_distributed
from tests.gkd_setup import make_gkd_setup, overrides, write_dataset
from tests.helpers.trainer_runs import train_on_rank
from tests.hf_models import make_tokenizer_variant

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> dict:
    """A tiny GKD setup and a run of 2 steps that saved its checkpoint at iteration 2."""
    root = tmp_path_factory.mktemp("resume")
    setup = make_gkd_setup(root / "setup")
    out = root / "run"
    run_distributed(train_on_rank, 1, overrides(setup, out), 2, save=True, timeout=300)
    return {"setup": setup, "out": out, "root": root}


def plan(checkpointed: dict, tmp_path: Path, setup: dict | None = None, **fields):
    """`plan_resume` for a run over a copy of the checkpointed output dir, with `fields` changed."""
    from megatron_opd.checkpoint.run_models import resolve_models
    from megatron_opd.config.job import load_job_config
    from megatron_opd.trainer.resume_check import plan_resume, run_identity

    out = tmp_path / "run"
    if not out.exists():
        shutil.copytree(checkpointed["out"], out)
    config = load_job_config(None, overrides(setup or checkpointed["setup"], out, **fields), world_size=2)
    return plan_resume(config, run_identity(config, resolve_models(config).tokenizer))


def refused(checkpointed: dict, tmp_path: Path, setup: dict | None = None, **fields) -> str:
    from megatron_opd.config import ConfigError

    with pytest.raises(ConfigError, match="is refused") as error:
        plan(checkpointed, tmp_path, setup, **fields)
    return str(error.value)


def perturbed_copy(source: str, target: Path) -> str:
    """`source`'s model directory with every weight moved by 1e-3: the same shape, other weights."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    save_file({name: tensor + 1e-3 for name, tensor in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    return str(target)


def test_unchanged_run_resumes_without_lines(checkpointed, tmp_path):
    resume = plan(checkpointed, tmp_path)
    assert resume.checkpoint.name == "iter_0000002" and resume.applied == [] and resume.lines() == []


def test_schedule_and_interval_changes_are_applied_with_a_line(checkpointed, tmp_path):
    val = write_dataset(tmp_path / "val.jsonl", 16, seed=98)  # held-out data: never trained on
    resume = plan(checkpointed, tmp_path, **{"optimizer.lr": 3e-3, "training.train_iters": 5,
                                             "training.save_interval": 1, "parallel.tensor_model_parallel_size": 2,
                                             "data.val_dataset": f"[{val}]"})
    assert {change.field for change in resume.applied} == {
        "optimizer.lr", "training.train_iters", "training.save_interval", "parallel.tensor_model_parallel_size",
        "data.val_dataset"}
    assert "resume: optimizer.lr: 0.001 -> 0.003 (applied)" in resume.lines()


def test_a_model_of_the_same_shape_is_refused(checkpointed, tmp_path):
    other = perturbed_copy(checkpointed["setup"]["student"], tmp_path / "other_student")
    message = refused(checkpointed, tmp_path, model=other)
    assert f"model: '{checkpointed['setup']['student']}' -> '{other}' (other contents)" in message
    assert "training.resume_allow_changes=[model]" in message


def test_the_same_path_with_other_weights_is_refused(checkpointed, tmp_path):
    setup = dict(checkpointed["setup"], teacher=perturbed_copy(checkpointed["setup"]["teacher"], tmp_path / "t"))
    # the checkpoint was trained with the original teacher at another path: moving it is no change...
    moved = dict(checkpointed["setup"], teacher=str(shutil.copytree(checkpointed["setup"]["teacher"], tmp_path / "m")))
    assert plan(checkpointed, tmp_path, moved).applied == []
    # ...while other weights are, whatever the path
    assert "teacher_model: " in refused(checkpointed, tmp_path, setup)


def test_other_data_of_the_same_length_is_refused(checkpointed, tmp_path):
    data = write_dataset(tmp_path / "train.jsonl", 64, seed=99)  # as many rows as the checkpoint's
    message = refused(checkpointed, tmp_path, **{"data.dataset": f"[{data}]"})
    assert "data.dataset: " in message and "(other contents)" in message


def test_another_tokenizer_is_refused(checkpointed, tmp_path):
    make_tokenizer_variant(tmp_path / "tokenizer", id_step=3)  # the same words at other ids
    assert "data.tokenizer: " in refused(checkpointed, tmp_path, **{"data.tokenizer": str(tmp_path / "tokenizer")})


def test_algorithm_parameters_are_refused_unless_allowed(checkpointed, tmp_path):
    message = refused(checkpointed, tmp_path, beta=0.1, temperature=0.7)
    assert "beta: 0.5 -> 0.1" in message and "temperature: 1.0 -> 0.7" in message
    assert "training.resume_allow_changes=[beta,temperature]" in message
    other = perturbed_copy(checkpointed["setup"]["student"], tmp_path / "other_student")
    resume = plan(checkpointed, tmp_path, beta=0.1, temperature=0.7, model=other,
                  **{"training.resume_allow_changes": "[beta, temperature, model]"})
    assert {change.field for change in resume.applied} >= {"beta", "temperature", "model"}


def test_a_section_name_allows_its_fields(checkpointed, tmp_path):
    data = write_dataset(tmp_path / "train.jsonl", 64, seed=99)
    resume = plan(checkpointed, tmp_path, **{"data.dataset": f"[{data}]", "data.max_length": 48,
                                             "training.resume_allow_changes": "[data]"})
    assert {change.field for change in resume.applied} >= {"data.dataset", "data.max_length"}


def test_resume_false_over_a_checkpoint_is_refused(checkpointed, tmp_path):
    from megatron_opd.config import ConfigError

    with pytest.raises(ConfigError, match="training.resume=False is invalid: .* holds checkpoints up to iter_0000002"):
        plan(checkpointed, tmp_path, **{"training.resume": False})


def test_unknown_allowed_field_is_refused_at_load(checkpointed, tmp_path):
    from megatron_opd.config import ConfigError
    from megatron_opd.config.job import load_job_config

    with pytest.raises(ConfigError, match=r"training.resume_allow_changes\[1\]='lrr' is invalid"):
        load_job_config(None, overrides(checkpointed["setup"], tmp_path,
                                        **{"training.resume_allow_changes": "[beta, lrr]"}), world_size=1)


def test_save_total_limit_keeps_the_newest_and_never_the_latest(tmp_path):
    from megatron_opd.trainer.checkpointing import LATEST_FILE, checkpoint_root, iteration_dir, prune_checkpoints

    for iteration in (2, 4, 6, 8):
        iteration_dir(tmp_path, iteration).mkdir(parents=True)
    (checkpoint_root(tmp_path) / LATEST_FILE).write_text("8\n")
    assert [path.name for path in prune_checkpoints(tmp_path, 2)] == ["iter_0000002", "iter_0000004"]
    assert sorted(path.name for path in checkpoint_root(tmp_path).iterdir()) == [
        "iter_0000006", "iter_0000008", LATEST_FILE]
    (checkpoint_root(tmp_path) / LATEST_FILE).write_text("6\n")  # latest is not the newest: it stays too
    assert prune_checkpoints(tmp_path, 1) == []
    assert sorted(path.name for path in checkpoint_root(tmp_path).iterdir()) == [
        "iter_0000006", "iter_0000008", LATEST_FILE]


# ---------------------------------------------------------------- end to end (the CLI)


def megatron_cosine_lr(step: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """Megatron-Core's OptimizerParamScheduler.get_lr for lr_decay_style cosine, written out."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    ratio = (step - warmup) / (decay_steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def train_cli(setup: dict, out: Path, **fields) -> subprocess.CompletedProcess:
    argv = overrides(setup, out, **fields)
    return subprocess.run([sys.executable, "-m", "megatron_opd.train", *argv], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "MEGATRON_OPD_DEVICE": "cpu"})


def records(out: Path) -> list[tuple[str, int]]:
    return [(record["split"], record["step"]) for record in map(json.loads, (out / "metrics.jsonl").open())]


@pytest.mark.slow  # ~25 s: three CLI runs
def test_resume_after_a_crash_applies_the_new_schedule_and_repeats_no_metrics(checkpointed, tmp_path):
    """A run logs step 3 and dies before checkpointing it; the rerun, with a longer run and
    another lr, resumes at 2: the lr of steps 3..5 is Megatron's cosine for the new values at
    those steps (the checkpoint's schedule would give min_lr), metrics.jsonl and TensorBoard
    hold each step once, and save_total_limit keeps the newest two checkpoints."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_opd.trainer.checkpointing import LATEST_FILE, checkpoint_root

    setup, out = checkpointed["setup"], tmp_path / "run"
    first = {"training.train_iters": 3, "training.save_interval": 2, "training.tensorboard": True,
             "optimizer.lr_decay_style": "cosine"}
    assert train_cli(setup, out, **first).returncode == 0
    shutil.rmtree(checkpoint_root(out) / "iter_0000003")  # it died after logging step 3
    (checkpoint_root(out) / LATEST_FILE).write_text("2\n")
    assert records(out) == [("train", 1), ("train", 2), ("train", 3)]

    resumed = train_cli(setup, out, **{**first, "training.train_iters": 5, "optimizer.lr": 3e-3,
                                       "training.save_interval": 1, "training.save_total_limit": 2})
    assert resumed.returncode == 0, resumed.stderr
    assert "resume: optimizer.lr: 0.001 -> 0.003 (applied)" in resumed.stdout
    assert "resume: training.train_iters: 3 -> 5 (applied)" in resumed.stdout
    assert records(out) == [("train", step) for step in range(1, 6)]
    lrs = {record["step"]: record["lr"] for record in map(json.loads, (out / "metrics.jsonl").open())}
    for step in (3, 4):  # the lr a step reports is the schedule's after that step
        assert lrs[step] == pytest.approx(megatron_cosine_lr(step, 3e-3, 0.0, 0, 5), rel=1e-9, abs=1e-12)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert sorted(path.name for path in checkpoint_root(out).glob("iter_*")) == ["iter_0000004", "iter_0000005"]


@pytest.mark.slow  # ~15 s
def test_start_summary_and_interrupt(checkpointed, tmp_path):
    """The start lines name the layout and each model's parameters (HF's count plus Megatron's
    vocab padding rows); Ctrl-C ends the run with one line naming the checkpoint a rerun
    resumes from, exit code 130, no traceback, no partial checkpoint left."""
    import signal
    import time

    from transformers import AutoModelForCausalLM

    from megatron_opd.trainer.checkpointing import checkpoint_root, latest_checkpoint

    setup, out = checkpointed["setup"], tmp_path / "run"
    argv = overrides(setup, out, **{"training.train_iters": 200, "training.save_interval": 1})
    process = subprocess.Popen([sys.executable, "-m", "megatron_opd.train", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "MEGATRON_OPD_DEVICE": "cpu"})
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("[train] step 2/"):
            time.sleep(0.3)
            process.send_signal(signal.SIGINT)
            break
    stdout = "".join(lines) + process.stdout.read()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    latest = latest_checkpoint(out)
    assert last.startswith("megatron_opd.train: error: interrupted during iteration ")
    assert last.endswith(f"rerun the same command to resume from {latest}")
    assert not list(checkpoint_root(out).glob(".*")), "a partial checkpoint was left"

    assert "run: 1 rank(s) = TP 1 x PP 1 x DP 1 on cpu (gloo), float32" in stdout
    for role, key in (("student", "student"), ("teacher", "teacher")):
        hf = AutoModelForCausalLM.from_pretrained(setup[key], dtype=torch.float32)
        padded_rows = 128 - hf.config.vocab_size % 128 if hf.config.vocab_size % 128 else 0
        heads = 1 if hf.config.tie_word_embeddings else 2
        count = hf.num_parameters() + padded_rows * hf.config.hidden_size * heads
        summary = next(line for line in stdout.splitlines() if line.startswith(f"{role}: "))
        assert f"{count / 1e3:.1f}K parameters" in summary, (summary, count)
