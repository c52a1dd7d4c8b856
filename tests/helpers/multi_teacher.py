"""Two teachers, one student: the setup on disk, the rank body, and float64 references that
compute each row against its own teacher densely in one process (HF transformers).

The data's `teacher` column is read back from the JSONL itself (by each example's dataset
row), not from what the trainer routed, so the reference routes independently.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.divergence_reference import dense_divergence
from tests.gkd_setup import make_gkd_setup
from tests.hf_models import VOCAB, make_hf_model
from tests.kd_hf_reference import hf_model, response_positions

CAPTURED = ("input_ids", "loss_mask", "prompt_length", "_row", "_teacher", "_position")


def add_teacher_column(path: Path, names: list[str], seed: int) -> list[str]:
    """Give each JSONL row a `teacher` drawn from `names` (seeded); the names in row order."""
    generator = torch.Generator().manual_seed(seed)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    chosen = [names[int(torch.randint(0, len(names), (1,), generator=generator))] for _ in rows]
    path.write_text("".join(json.dumps({**row, "teacher": name}) + "\n" for row, name in zip(rows, chosen)))
    return chosen


def make_two_teacher_setup(root: Path) -> dict:
    """The GKD setup (student qwen2, teacher `a` llama2) plus teacher `b` (another qwen2 of
    other weights), train rows routed to a or b at random."""
    setup = make_gkd_setup(root)
    setup["teacher_b"] = str(make_hf_model("qwen2", root / "teacher_b", seed=11))
    setup["routes"] = add_teacher_column(Path(setup["train"]), ["a", "b"], seed=5)
    add_teacher_column(Path(setup["val"]), ["a", "b"], seed=6)
    return setup


def teachers_field(setup: dict, b: dict | None = None, a: dict | None = None) -> str:
    """The `teachers=` override value: a -> setup teacher, b -> teacher_b, extra fields each."""
    entries = [{"name": "a", "model": setup["teacher"], **(a or {})}, {"name": "b", "model": setup["teacher_b"], **(b or {})}]
    return json.dumps(entries)


def train_on_rank(argv: list[str], steps: int) -> dict:
    """`steps` steps; per step the metrics and the examples (`CAPTURED`); weights before and
    after, and the last step's gradients."""
    from megatron_opd.config.job import load_job_config
    from megatron_opd.models import gather_full_tensors
    from megatron_opd.trainer.trainer import Trainer

    trainer = Trainer(load_job_config(None, argv))
    result = {"examples": []}
    responses = trainer.algorithm.responses

    def capture(context, iteration):
        out = responses(context, iteration)
        result["examples"].append([{key: example.get(key) for key in CAPTURED} for example in out.examples])
        return out

    trainer.algorithm.responses = capture
    result["initial"] = {name: tensor.clone() for name, tensor in gather_full_tensors(trainer.model)}
    result["steps"] = [trainer.train_step() for _ in range(steps)]
    result["weights"] = {name: tensor.clone() for name, tensor in gather_full_tensors(trainer.model)}
    result["grads"] = {name: tensor.clone()
                       for name, tensor in gather_full_tensors(trainer.model, lambda param: param.main_grad)}
    return result


def merged(results: list[dict]) -> dict:
    """Every rank's weights and gradients, the first step's examples of every DP rank (each
    once: the ranks of a model-parallel group hold the same), the last stage's metrics."""
    combined = {"initial": {}, "weights": {}, "grads": {}}
    examples = {}
    for result in results:
        for key in ("initial", "weights", "grads"):
            combined[key].update(result[key])
        examples.update({example["_position"]: example for example in result["examples"][0]})
    combined["examples"] = [examples[position] for position in sorted(examples)]
    combined["steps"] = next(r["steps"] for r in results if r["steps"][0])
    return combined


def gkd_reference(student_dir: str, teachers: dict[str, dict], routes: list[str], examples: list[dict], *,
                  beta: float) -> dict:
    """Loss, per-teacher divergence sums / token counts, and the student's float64 gradient of
    sum_t D(row's teacher at its temperature / top-K)(t) / N. `teachers`: name -> {dir, temperature, topk}."""
    student = hf_model(student_dir)
    student.zero_grad(set_to_none=True)
    per_teacher: dict[str, list[torch.Tensor]] = {name: [] for name in teachers}
    for example in examples:
        name = routes[example["_row"]]
        spec = teachers[name]
        ids = torch.tensor(example["input_ids"])
        rows = response_positions(example["input_ids"], example["loss_mask"])
        logits = student(ids[None, :-1]).logits[0, rows, :VOCAB]
        with torch.no_grad():
            teacher_logits = hf_model(spec["dir"])(ids[None, :-1]).logits[0, rows, :VOCAB]
        per_teacher[name].append(dense_divergence(logits, teacher_logits, beta=beta, temperature=spec["temperature"],
                                                  topk=spec["topk"]))
    sums = {name: torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
            for name, values in per_teacher.items()}
    tokens = sum(values.numel() for values in sums.values())
    loss = sum(values.sum() for values in sums.values()) / tokens
    loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "tokens": tokens, "grads": grads,
            "divergence": {name: values.sum().item() / tokens for name, values in sums.items()},
            "teacher_tokens": {name: values.numel() for name, values in sums.items()}}


def _token_logprobs(model: torch.nn.Module, example: dict, temperature: float) -> torch.Tensor:
    ids = torch.tensor(example["input_ids"])
    start = example["prompt_length"]
    logits = model(ids[None, :-1]).logits[0, start - 1:, :VOCAB].double()
    return F.log_softmax(logits / temperature, dim=-1).gather(-1, ids[start:, None]).squeeze(-1)


def opd_rl_reference(student_dir: str, teachers: dict[str, dict], routes: list[str], examples: list[dict], *,
                     temperature: float, teacher_kl_coef: float) -> dict:
    """One OPD-RL update without rewards (A_t = coef * (log p_T - log p_S), ratio 1): each
    sample's log-ratio against its prompt's teacher (at that teacher's temperature; the
    student's at the run's), and the per-teacher k3 teacher_kl sums."""
    student = hf_model(student_dir)
    student.zero_grad(set_to_none=True)
    loss_terms, kl = [], {name: [] for name in teachers}
    for example in sorted(examples, key=lambda example: example["_position"]):
        name = routes[example["_row"]]
        logprobs = _token_logprobs(student, example, temperature)
        with torch.no_grad():
            teacher_logprobs = _token_logprobs(hf_model(teachers[name]["dir"]), example, teachers[name]["temperature"])
        old = logprobs.detach()
        advantages = teacher_kl_coef * (teacher_logprobs - old)
        loss_terms.append(-(torch.exp(logprobs - old) * advantages))
        d = teacher_logprobs - old
        kl[name].append(torch.expm1(d) - d)
    per_token = torch.cat(loss_terms)
    tokens = per_token.numel()
    loss = per_token.sum() / tokens
    loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    kl_sums = {name: torch.cat(values).sum().item() / tokens if values else 0.0 for name, values in kl.items()}
    return {"loss": loss.item(), "tokens": tokens, "grads": grads, "teacher_kl": kl_sums,
            "teacher_tokens": {name: sum(v.numel() for v in values) for name, values in kl.items()}}


def rows_seen_on_rank(argv: list[str]) -> dict:
    """One step; the dataset rows each teacher was run on (its microbatches' rows), and every
    example's dataset row."""
    from megatron_opd.config.job import load_job_config
    from megatron_opd.trainer.trainer import Trainer

    trainer = Trainer(load_job_config(None, argv))
    seen: dict[str, list[int]] = {}
    examples_seen: list[dict] = []
    for member in trainer.teachers.members:
        forward = member.source.forward

        def record(batches, examples, forward=forward, name=member.name):
            examples_seen[:] = examples
            seen.setdefault(name, []).extend(examples[row]["_row"] for batch in batches for row in batch.rows)
            return forward(batches, examples)

        member.source.forward = record
    trainer.train_step()
    return {"seen": seen, "rows": [example["_row"] for example in examples_seen]}


def start_error_on_rank(argv: list[str]) -> str:
    """The error a Trainer's start raises (as text), or '' when it starts."""
    from megatron_opd.config.job import load_job_config
    from megatron_opd.trainer.trainer import Trainer

    try:
        Trainer(load_job_config(None, argv))
    except Exception as error:  # the test reads the message
        return f"{type(error).__name__}: {error}"
    return ""


def served_copy(model_dir: str, tokenizer_dir: str, out: Path) -> str:
    """`model_dir` with the run's tokenizer beside it (what serve-teacher loads)."""
    import os
    import shutil

    shutil.copytree(model_dir, out)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(Path(tokenizer_dir) / name, out / name)
    return str(out)


def offload_counts_on_rank(argv: list[str]) -> dict:
    """One step with offloaded teachers: per teacher its weight loads and the bytes left on the
    device after the step; the step's loss."""
    from megatron_opd.config.job import load_job_config
    from megatron_opd.trainer.trainer import Trainer

    trainer = Trainer(load_job_config(None, argv))
    metrics = trainer.train_step()
    return {"loss": metrics.get("loss"),
            "teachers": {member.name: {"loads": member.source.offload.loads,
                                       "resident": member.source.offload.resident_bytes()}
                         for member in trainer.teachers.members if member.source.offload is not None}}


def evaluate_on_rank(argv: list[str]) -> dict:
    """The held-out metrics of a fresh trainer (`Trainer.evaluate`: val rows routed too)."""
    from megatron_opd.config.job import load_job_config
    from megatron_opd.trainer.trainer import Trainer

    return Trainer(load_job_config(None, argv)).evaluate()


def train_and_save_on_rank(argv: list[str], steps: int) -> int:
    """`steps` steps from wherever the output directory's checkpoint left off, then a checkpoint;
    the iteration reached."""
    from megatron_opd.config.job import load_job_config
    from megatron_opd.trainer.trainer import Trainer

    trainer = Trainer(load_job_config(None, argv))
    for _ in range(steps):
        trainer.train_step()
    trainer.save()
    return trainer.iteration
