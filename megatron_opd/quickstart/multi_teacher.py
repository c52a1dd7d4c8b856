"""The CPU demo of several teachers in one run (`make demo-multi-teacher`).

    torchrun --nproc-per-node 2 -m megatron_opd.quickstart.multi_teacher --out outputs/demo_multi_teacher

Two specialists (`SPECIALISTS`, shipped, made by tools/make_quickstart_teacher.py `--tasks`):
one learned only the quickstart's digit permutations, the other only little-endian addition;
each is near 0 on the other's task (their task.json). The demo starts like the quickstart
(data, tokenizer, the small student with an SFT warm-up, here on both tasks' rows, at
TP=1 x DP=2) and then trains at TP=2 from `configs/demo_multi_teacher_cpu.yaml`, each run from
the same warmed-up student for the same steps at the same batch:

- multi_teacher: on-policy GKD on both tasks' rows mixed, each row carrying `teacher:
  permute|addition`, so each row is distilled from its own specialist (`teachers:`);
- single_permute, single_addition: GKD from one specialist on its task's rows only
  (`teacher_model`), the single-teacher baselines.

`metrics.json` gets, per run, the held-out greedy accuracy on each task before and after
(`runs.<run>.accuracy_before|after.<task>`, the same prompts for every run) and the
specialists' own accuracies. The exit code is 0 when the multi-teacher student got better
on both tasks. Extra arguments are the quickstart's (`--student-warmup-iters`,
`--train-rows` per task, `--val-rows` per task, ...) and key=value overrides of the config.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_opd.quickstart.run import (
    TASKS,
    Stages,
    greedy_accuracy,
    make_task,
    parse_args,
    prepare,
    read_rows,
    stage_config,
)
from megatron_opd.quickstart.task import write_dataset

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_multi_teacher_cpu.yaml"
# One specialist per task, the teacher named like the task.
SPECIALISTS = {task: Path(__file__).resolve().parent / f"teacher_{task}" for task in TASKS}
# The warm-up gives the student both answer formats (on-policy samples of a model that writes
# neither teach nothing) and stops early enough to leave room on both (after 100 steps:
# permute 0.34, addition 0.06; after 200: permute already 0.93).
WARMUP_ITERS = 100
TRAIN_ROWS = 4000  # per task
VAL_ROWS = 128  # per task
RUNS = ("multi_teacher", *(f"single_{task}" for task in TASKS))


def task_args(args, task: str):
    """`args` for one task (its data and scoring): the quickstart's options with `--task`."""
    return parse_args(["--task", task, "--out", str(args.out)])


def teacher_of(task: str) -> str:
    """The teacher a row of `task` names in its `teacher` column: that task's specialist."""
    return task


def write_data(args) -> None:
    """OUT/data_<task>/ per task (train and val rows, each with its `teacher`), and OUT/data/:
    both tasks' training rows shuffled together (the multi-teacher run's and the warm-up's
    data) and their held-out rows."""
    out = args.out
    mixed: dict = {"train": [], "val": []}
    for task in TASKS:
        paths = write_dataset(out / f"data_{task}", make_task(task_args(args, task)), args.train_rows, args.val_rows)
        for split, path in paths.items():
            rows = [{**row, "teacher": teacher_of(task)} for row in read_rows(path)]
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            mixed[split] += rows
    random.Random(0).shuffle(mixed["train"])
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in mixed.items():
        (out / "data" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def run_fields(name: str, out: Path) -> list[str]:
    """The config overrides of run `name` (the rest is the demo config's)."""
    if name == "multi_teacher":
        teachers = [{"name": task, "model": str(SPECIALISTS[task])} for task in TASKS]
        return [f"teachers={json.dumps(teachers)}", "teacher_model=null"]
    task = name.removeprefix("single_")
    return ["teachers=[]", f"teacher_model={SPECIALISTS[task]}",
            f"data.dataset=[{out / f'data_{task}' / 'train.jsonl'}]",
            f"data.val_dataset=[{out / f'data_{task}' / 'val.jsonl'}]"]


def specialist_accuracy() -> dict:
    """Each specialist's held-out greedy accuracy on each task, as its task.json recorded it."""
    return {task: json.loads((path / "task.json").read_text())["held_out_greedy_accuracy"]
            for task, path in SPECIALISTS.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(["--config", str(CONFIG), *argv], student_warmup_iters=WARMUP_ITERS,
                      train_rows=TRAIN_ROWS, val_rows=VAL_ROWS)
    args.out = args.out.resolve()
    out = args.out
    missing = [str(path) for path in SPECIALISTS.values() if not (path / "model.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"the specialist teachers {missing} are not in this checkout: make them with "
                                "tools/make_quickstart_teacher.py --tasks TASK --target DIR")
    stages = Stages(args, stage_config(args))
    if stages.rank_zero:
        shutil.rmtree(out / "data", ignore_errors=True)
        write_data(args)
        prepare(args)  # the tokenizer and the random student (the data is written above)
        for name in RUNS:  # trained from scratch on every run
            shutil.rmtree(out / name, ignore_errors=True)
    torch.distributed.barrier()
    tasks = {task: make_task(task_args(args, task)) for task in TASKS}
    val_rows = {task: read_rows(out / f"data_{task}" / "val.jsonl") for task in TASKS}

    def accuracy(trainer) -> dict:
        return {task: greedy_accuracy(trainer.model, trainer.tokenizer, trainer.vocab_size, val_rows[task],
                                      tasks[task]) for task in TASKS}

    student = stages.warm_up_student("teachers=[]")
    runs: dict = {}
    before: dict = {}
    configs = {}
    for name in RUNS:
        config = configs[name] = stage_config(args, *run_fields(name, out), f"model={student}",
                                              f"training.output_dir={out / name}")
        run = runs[name] = {"teachers": {spec.name: spec.model for spec in config.teacher_list()}}

        def measure_before(trainer) -> None:
            if not before:  # the same warmed-up student for every run
                before.update(accuracy(trainer))

        def measure_after(trainer, name=name, run=run) -> None:
            run.update(accuracy_before=dict(before), accuracy_after=accuracy(trainer))
            stages.say(f"{name}: " + ", ".join(f"{task} {before[task]:.3f} -> {run['accuracy_after'][task]:.3f}"
                                               for task in TASKS))

        stages.run(name, config, before=measure_before, after=measure_after)
        run.update(seconds=stages.seconds[name], cpu_seconds=stages.cpu_seconds[name])
    metrics: dict = {"runs": runs, "student_accuracy_before": before,
                     "student_accuracy_after": runs["multi_teacher"]["accuracy_after"],
                     "teacher_accuracy": specialist_accuracy()}
    config = configs["multi_teacher"]
    metrics["settings"] = {"algorithm": config.algorithm, "lmbda": config.lmbda, "beta": config.beta,
                           "temperature": config.temperature, "lr": config.optimizer.lr,
                           "train_iters": config.training.train_iters,
                           "global_batch_size": config.training.global_batch_size,
                           "warmup_iters": args.student_warmup_iters, "train_rows_per_task": args.train_rows,
                           "val_prompts_per_task": args.val_rows, "teacher_column": config.teacher_column,
                           "tensor_model_parallel_size": config.parallel.tensor_model_parallel_size,
                           "rollout_engine": args.engine}
    stages.write_metrics(metrics, table(metrics))
    improved = all(metrics["student_accuracy_after"][task] > before[task] for task in TASKS)
    return 0 if improved else 1


def table(metrics: dict) -> str:
    header = "".join(f"{task + ' before':>17}{task + ' after':>16}" for task in TASKS)
    lines = [f"{'run':<16}{header}", "-" * (16 + 33 * len(TASKS))]
    for name, run in metrics["runs"].items():
        lines.append(f"{name:<16}" + "".join(f"{run['accuracy_before'][task]:>17.3f}{run['accuracy_after'][task]:>16.3f}"
                                             for task in TASKS))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
