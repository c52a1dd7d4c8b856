"""CPU demos of OPD-RL and OPSD on the addition task (`make demo-opd-rl`, `make demo-opsd`).

    torchrun --nproc-per-node 2 -m megatron_opd.quickstart.demos --method opd_rl --out outputs/demo_opd_rl

Both start like the quickstart (data, tokenizer, the small student with an SFT warm-up,
at TP=1 x DP=2) and then train at TP=2 from `configs/demo_<method>_cpu.yaml`:

- opd_rl: pure on-policy distillation as RL (no reward function): GRPO groups of the
  student's samples, each token's advantage the shipped teacher's log-ratio.
- opsd: self-distillation. Each row's `teacher_prompt` is the answer, '=', then the
  prompt ("58=47+38=" for "47+38="): privileged information. The warm-up also trains
  on such hinted prompts, so the model learns to use a hint (copying is easy) while it
  still adds poorly; OPSD then distills the hinted model (a frozen copy of itself after
  the warm-up: fixed mode) into the unhinted one on the student's own samples.

`metrics.json` gets `teacher_kl_before`, `teacher_kl_after` (OPD-RL's k3 estimate of
KL(student || teacher) per token, on the student's samples for the held-out prompts;
for OPSD the teacher is the student with the hint) and `student_accuracy_before`,
`student_accuracy_after` (greedy, held-out prompts, no hint). Extra arguments are the
quickstart's (`--student-warmup-iters`, ...) and key=value overrides of the demo config.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_opd.algorithms.opd_rl import TeacherKL
from megatron_opd.config.schema import ConfigError
from megatron_opd.quickstart.run import (
    SHIPPED_TEACHER,
    Stages,
    greedy_accuracy,
    make_task,
    parse_args,
    prepare,
    read_rows,
    shipped_teacher_matches,
    stage_config,
)
from megatron_opd.quickstart.task import answer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
METHODS = ("opd_rl", "opsd")
# OPD-RL's signal is one sampled token's log-ratio: it needs a student whose samples the
# teacher mostly accepts (from the 400-step student, right 28% of the time, the teacher's
# -20..-36 log-probs of its wrong digits drown the batch and the student gets worse).
WARMUP_ITERS = {"opd_rl": 1200, "opsd": 400}
# The demos' data: 20,000 addition rows (the quickstart's small prompt budget is its own point).
DEMO_TRAIN_ROWS = 20000
METRIC_KEYS = ("teacher_kl_before", "teacher_kl_after", "student_accuracy_before", "student_accuracy_after")


def hinted(row: dict, little_endian: bool) -> dict:
    """`row` with OPSD's privileged teacher prompt: the answer, '=', then the prompt."""
    return {**row, "teacher_prompt": f"{answer(row['prompt'], little_endian)}={row['prompt']}"}


def write_opsd_data(out: Path, little_endian: bool) -> None:
    """data_opsd/: train and val rows with teacher prompts, and the warm-up rows: every
    training row once as it is and once with its teacher prompt as the prompt."""
    target = out / "data_opsd"
    target.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        rows = [hinted(row, little_endian) for row in read_rows(out / "data" / f"{split}.jsonl")]
        (target / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    rows = read_rows(target / "train.jsonl")
    warmup = [{"prompt": row["prompt"], "completion": row["completion"]} for row in rows]
    warmup += [{"prompt": row["teacher_prompt"], "completion": row["completion"]} for row in rows]
    (target / "warmup.jsonl").write_text("".join(json.dumps(row) + "\n" for row in warmup))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron_opd.quickstart.demos", add_help=False)
    parser.add_argument("--method", choices=METHODS, required=True)
    known, rest = parser.parse_known_args(argv)
    method = known.method
    args = parse_args(["--config", str(CONFIGS / f"demo_{method}_cpu.yaml"), *rest],
                      student_warmup_iters=WARMUP_ITERS[method], task="addition", train_rows=DEMO_TRAIN_ROWS)
    out = args.out.resolve()
    opsd = method == "opsd"
    data = [f"data.dataset=[{out / 'data_opsd' / 'train.jsonl'}]",
            f"data.val_dataset=[{out / 'data_opsd' / 'val.jsonl'}]"] if opsd else []
    stages = Stages(args, stage_config(args, *data))
    little_endian = args.digit_order == "little"
    if stages.rank_zero:
        prepare(args)
        shutil.rmtree(out / method, ignore_errors=True)  # trained from scratch on every run
        if opsd:
            write_opsd_data(out, little_endian)
    torch.distributed.barrier()
    val_rows = read_rows(args.out / "data" / "val.jsonl")

    teacher = []
    if not opsd:
        if args.teacher == "auto" and not shipped_teacher_matches(args):
            raise ConfigError(f"the shipped teacher ({SHIPPED_TEACHER}) was not trained on this task: pass "
                              "--teacher PATH, or make one with tools/make_quickstart_teacher.py")
        teacher = [f"teacher_model={SHIPPED_TEACHER if args.teacher == 'auto' else Path(args.teacher).resolve()}"]
    warmup = [f"data.dataset=[{out / 'data_opsd' / 'warmup.jsonl'}]"] if opsd else []
    student = stages.warm_up_student(*warmup)
    if opsd:
        # Fixed mode: a frozen copy of the warmed-up student reads the hint. Its current
        # weights (dynamic mode) would let both sides drift to a common trivial answer.
        teacher = [f"teacher_model={student}"]
    config = stage_config(args, *data, *teacher, f"model={student}", f"training.output_dir={out / method}")
    metrics: dict = {}

    def measure(trainer, when: str) -> None:
        kl = trainer.evaluate(loss=TeacherKL(temperature=config.temperature, vocab_size=trainer.vocab_size),
                              sample=True)
        metrics[f"teacher_kl_{when}"] = kl.get("teacher_kl", float("nan"))
        metrics[f"student_accuracy_{when}"] = greedy_accuracy(trainer.model, trainer.tokenizer, trainer.vocab_size,
                                                              val_rows, make_task(args))
        stages.say(f"{when}: teacher_kl {metrics[f'teacher_kl_{when}']:.4f}, "
                   f"accuracy {metrics[f'student_accuracy_{when}']:.3f}")

    stages.run(method, config, before=lambda t: measure(t, "before"), after=lambda t: measure(t, "after"))
    metrics["settings"] = {"method": method, "algorithm": config.algorithm, "teacher": config.teacher,
                           "rollout_engine": args.engine,
                           "teacher_model": config.teacher_model,
                           "train_iters": config.training.train_iters, "val_prompts": len(val_rows),
                           "tensor_model_parallel_size": config.parallel.tensor_model_parallel_size}
    stages.write_metrics(metrics, table(method, metrics))
    improved = (metrics["teacher_kl_after"] < metrics["teacher_kl_before"]
                and metrics["student_accuracy_after"] > metrics["student_accuracy_before"])
    return 0 if improved else 1


def table(method: str, metrics: dict) -> str:
    lines = [f"{method:<12}{'teacher_kl':>12}{'accuracy':>10}", "-" * 34]
    for when in ("before", "after"):
        lines.append(f"{when:<12}{metrics[f'teacher_kl_{when}']:>12.4f}{metrics[f'student_accuracy_{when}']:>10.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
