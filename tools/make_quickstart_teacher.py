"""Train the CPU quickstart's teacher and ship it: megatron_opd/quickstart/teacher/ (HF, ~3 MB).

    torchrun --standalone --nproc-per-node 2 tools/make_quickstart_teacher.py [--iters 3000] [--init DIR]
    torchrun --standalone --nproc-per-node 2 tools/make_quickstart_teacher.py --tasks addition \
        --target megatron_opd/quickstart/teacher_addition    # a specialist (make demo-multi-teacher)

One teacher for both tasks of `megatron_opd.quickstart.task`: the quickstart's permutation
task and the demos' addition (`make demo-opd-rl` distills it too). It is trained with the
quickstart's own teacher stage (`python -m megatron_opd.quickstart --teacher-only`: same
tokenizer, model and trainer) on an even mix of both tasks' training rows; `--init` starts
from an existing teacher (the shipped one was: the addition-only teacher of 3000 steps,
then this). Copies the exported HF directory and writes `task.json`: the tasks it learned
(what `shipped_teacher_matches` reads), the recipe, and each task's held-out greedy
accuracy, measured here with transformers' own `generate` (independent of our sampler).

`--tasks` trains on fewer tasks: the specialists of `make demo-multi-teacher`
(`--target megatron_opd/quickstart/teacher_<task>`), one per task, whose task.json lists the one
task they learned and the held-out accuracy on both (the other task's near zero).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEEP = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
TASK_ARGS = {"permute": ["--task", "permute"], "addition": ["--task", "addition"]}


def hf_greedy_accuracy(model_dir: Path, task, rows: list[dict]) -> float:
    """`task.score` of transformers' greedy completions of `rows`' prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    completions = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]])
            out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            completions.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return task.score([row["prompt"] for row in rows], completions)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--global-batch-size", type=int, default=128)
    parser.add_argument("--rows-per-task", type=int, default=40000)
    parser.add_argument("--init", type=Path, default=None, help="an HF teacher to start from (default: random)")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/quickstart_teacher"))
    parser.add_argument("--tasks", type=task_names, default=list(TASK_ARGS),
                        help="comma-separated tasks to train on, of permute,addition (default: both)")
    parser.add_argument("--target", type=Path, default=None,
                        help="where the teacher is written (default: the shipped teacher's directory)")
    args = parser.parse_args()
    os.environ.setdefault("MEGATRON_OPD_DEVICE", "cpu")
    from megatron_opd.quickstart.run import SHIPPED_TEACHER, make_task, parse_args, task_description
    from megatron_opd.quickstart.run import main as quickstart
    from megatron_opd.quickstart.task import write_dataset

    workdir = args.workdir
    target = args.target or SHIPPED_TEACHER
    tasks = {name: parse_args(["--out", str(workdir), *extra]) for name, extra in TASK_ARGS.items()}
    trained = args.tasks
    if int(os.environ.get("RANK", "0")) == 0:
        # The quickstart's teacher stage trains on OUT/data (kept when present): the mix of the trained
        # tasks, validated on the first of them.
        shutil.rmtree(workdir, ignore_errors=True)
        rows = []
        for name, task_args in tasks.items():
            paths = write_dataset(workdir / f"data_{name}", make_task(task_args), args.rows_per_task, 256)
            if name in trained:
                rows += paths["train"].read_text().splitlines()
        random.Random(0).shuffle(rows)
        (workdir / "data").mkdir(parents=True)
        (workdir / "data" / "train.jsonl").write_text("\n".join(rows) + "\n")
        shutil.copy(workdir / f"data_{trained[0]}" / "val.jsonl", workdir / "data" / "val.jsonl")
        if args.init is not None:
            shutil.copytree(args.init, workdir / "teacher_init")
            (workdir / "teacher_init" / "task.json").unlink(missing_ok=True)
    argv = ["--out", str(workdir), *TASK_ARGS[trained[0]], "--teacher", "train", "--teacher-only",
            "--teacher-iters", str(args.iters), "--teacher-lr", str(args.lr), "--teacher-batch",
            str(args.global_batch_size), "training.log_interval=100"]
    quickstart(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    exported = workdir / "teacher" / "hf"
    accuracy = {}
    for name, task_args in tasks.items():
        rows = [json.loads(line) for line in (workdir / f"data_{name}" / "val.jsonl").read_text().splitlines()]
        accuracy[name] = hf_greedy_accuracy(exported, make_task(task_args), rows)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in KEEP:
        shutil.copy2(exported / name, target / name)
    info = {"tasks": [task_description(tasks[name]) for name in trained],
            "recipe": {"iters": args.iters, "lr": args.lr, "global_batch_size": args.global_batch_size,
                       "rows_per_task": args.rows_per_task,
                       "init": str(args.init) if args.init else None,
                       "command": "torchrun --standalone --nproc-per-node 2 tools/make_quickstart_teacher.py "
                                  + " ".join(sys.argv[1:])},
            "held_out_greedy_accuracy": accuracy}
    (target / "task.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(path.stat().st_size for path in target.iterdir())
    print(f"wrote {target} ({size / 2**20:.1f} MiB), held-out greedy accuracy {accuracy}", flush=True)
    return 0


def task_names(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    if not names or any(name not in TASK_ARGS for name in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"tasks must be a comma-separated list of {list(TASK_ARGS)}, got {text!r}")
    return names


if __name__ == "__main__":
    sys.exit(main())
