"""Train the CPU quickstart's teacher and ship it: megatron_opd/quickstart/teacher/ (HF, ~3 MB).

    torchrun --standalone --nproc-per-node 2 tools/make_quickstart_teacher.py [--iters 3000]

The quickstart trains a teacher itself when this one is missing or was made for another
task (`--max-digits`, `--digit-order`); a shipped one, trained longer than a quickstart can
afford, makes the quickstart shorter and its teacher better. Runs the quickstart's own
teacher stage (`python -m megatron_opd.quickstart --teacher-only`: same task, tokenizer,
model and trainer), then copies the exported HF directory and writes `task.json` (the task,
the recipe and the held-out greedy accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEEP = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--global-batch-size", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=Path("outputs/quickstart_teacher"))
    args = parser.parse_args()
    os.environ.setdefault("MEGATRON_OPD_DEVICE", "cpu")
    from megatron_opd.quickstart.run import SHIPPED_TEACHER, main as quickstart

    argv = ["--out", str(args.workdir), "--teacher", "train", "--teacher-only", "--teacher-iters", str(args.iters),
            "--teacher-lr", str(args.lr), "--teacher-batch", str(args.global_batch_size), "training.log_interval=100"]
    quickstart(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    exported = args.workdir / "teacher" / "hf"
    shutil.rmtree(SHIPPED_TEACHER, ignore_errors=True)
    SHIPPED_TEACHER.mkdir(parents=True)
    for name in KEEP:
        shutil.copy2(exported / name, SHIPPED_TEACHER / name)
    accuracy = json.loads((args.workdir / "metrics.json").read_text())["teacher_accuracy"]
    info = {"task": {"max_digits": 2, "digit_order": "little", "seed": 0},
            "recipe": {"iters": args.iters, "lr": args.lr, "global_batch_size": args.global_batch_size,
                       "command": "torchrun --standalone --nproc-per-node 2 tools/make_quickstart_teacher.py "
                                  + " ".join(sys.argv[1:])},
            "held_out_greedy_accuracy": accuracy}
    (SHIPPED_TEACHER / "task.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(path.stat().st_size for path in SHIPPED_TEACHER.iterdir())
    print(f"wrote {SHIPPED_TEACHER} ({size / 2**20:.1f} MiB), held-out accuracy {accuracy:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
