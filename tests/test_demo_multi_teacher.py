"""The multi-teacher CPU demo (`make demo-multi-teacher`) end to end on two gloo ranks.

What the demo runs, at its own length: the data of both tasks (each row naming its task's
specialist), the student's warm-up, GKD from both specialists at once and from each alone,
per-task held-out accuracy before and after, `metrics.json` and the exit code. Checked:
the multi-teacher student gets better on both tasks, by a margin; each single-teacher
baseline gets better on its own task; both teachers got tokens at every step (per-teacher
metrics of the trainer). The specialists themselves are checked with transformers'
`generate` (independent of our sampler): each knows its task and not the other.
"""

from __future__ import annotations

import json

import pytest

from megatron_opd.quickstart.multi_teacher import RUNS, SPECIALISTS
from megatron_opd.quickstart.run import TASKS, make_task, parse_args
from megatron_opd.testing import run_distributed

# The multi-teacher student's held-out accuracy gain per task, at least (on 128 prompts per task).
ACCURACY_GAIN = {"permute": 0.1, "addition": 0.05}


def demo_on_rank(argv: list[str]) -> int:
    from megatron_opd.quickstart.multi_teacher import main

    return main(argv)


def hf_greedy_accuracy(model_dir, task, rows: list[dict]) -> float:
    """`task.score` of transformers' greedy completions of `rows`' prompts (one batch, left-padded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    batch = tokenizer([row["prompt"] for row in rows], add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return task.score([row["prompt"] for row in rows], completions)


def have_specialists() -> bool:
    return all((path / "model.safetensors").is_file() for path in SPECIALISTS.values())


@pytest.mark.skipif(not have_specialists(), reason="the specialist teachers are not in this checkout")
def test_specialists_know_only_their_task(tmp_path):
    """Each shipped specialist, run by transformers: right on its task's held-out prompts,
    wrong on the other task's (so a row routed to the wrong teacher teaches nothing right)."""
    rows = {task: make_task(parse_args(["--task", task])).rows(64, "val") for task in TASKS}
    for specialist, path in SPECIALISTS.items():
        info = json.loads((path / "task.json").read_text())
        assert [entry["task"] for entry in info["tasks"]] == [specialist]
        for task in TASKS:
            accuracy = hf_greedy_accuracy(path, make_task(parse_args(["--task", task])), rows[task])
            if task == specialist:
                assert accuracy >= 0.95, (specialist, task, accuracy)
            else:
                assert accuracy <= 0.05, (specialist, task, accuracy)


@pytest.mark.slow
@pytest.mark.skipif(not have_specialists(), reason="the specialist teachers are not in this checkout")
def test_demo_improves_both_tasks(tmp_path):
    out = tmp_path / "demo"
    codes = run_distributed(demo_on_rank, 2, ["--out", str(out)], timeout=900)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["runs"]) == set(RUNS)
    before = metrics["student_accuracy_before"]
    multi = metrics["runs"]["multi_teacher"]
    assert multi["teachers"] == {task: str(SPECIALISTS[task]) for task in TASKS}
    for task in TASKS:
        assert multi["accuracy_after"][task] >= before[task] + ACCURACY_GAIN[task], (task, before, multi)
        single = metrics["runs"][f"single_{task}"]
        assert single["accuracy_before"] == before, "every run starts from the same warmed-up student"
        assert single["teachers"] == {"teacher": str(SPECIALISTS[task])}
        assert single["accuracy_after"][task] > before[task], (task, single)
    assert codes == [0, 0], "the exit code says whether the student improved on both tasks"
    steps = [json.loads(line) for line in (out / "multi_teacher" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [step for step in steps if "loss" in step]
    assert train_steps
    for step in train_steps:  # both teachers had rows; their shares add up to the whole
        assert step["tokens/permute"] > 0 and step["tokens/addition"] > 0
        assert step["tokens/permute"] + step["tokens/addition"] == step["tokens"]
        assert step["divergence/permute"] + step["divergence/addition"] == pytest.approx(step["divergence"])
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert {row["teacher"] for row in rows} == set(TASKS)
    assert all(("+" in row["prompt"]) == (row["teacher"] == "addition") for row in rows)
