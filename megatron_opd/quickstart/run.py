"""The CPU quickstart: a teacher that knows a synthetic task, distilled into a smaller student
with on-policy GKD, compared with plain SFT of the same student on the same data.

    torchrun --nproc-per-node 2 -m megatron_opd.quickstart --out outputs/quickstart

Stages, all through the real `Trainer` (GKD at the layout of `configs/quickstart_cpu.yaml`,
TP=2 on two gloo ranks; the SFT stages at TP=1 x DP=2, faster for tiny models):
  1. data (multi-digit addition, `quickstart.task`), a character tokenizer and two
     randomly initialized Llama models, a teacher and a smaller student;
  2. the teacher: the shipped one (`SHIPPED_TEACHER`, when it learned this task), or one
     trained here with SFT (`--teacher train`; reused when a previous run finished it);
  3. the student gets a short SFT warm-up (the answer format: GKD's on-policy steps
     learn from the student's own samples, which say nothing while they are noise);
     its held-out accuracy (greedy) and KL(teacher || student) are the "before";
  4. GKD from the YAML (lmbda=0.5: half the steps on the student's own samples);
  5. the same student trained with SFT on the same data for the same steps;
  6. a table on stdout and `metrics.json` in the output dir.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_opd.algorithms.gkd import GKDLoss
from megatron_opd.config.job import JobConfig, load_job_config
from megatron_opd.quickstart.task import AdditionTask, score, write_dataset, write_random_model, write_tokenizer
from megatron_opd.rollout import MegatronSampler, SamplingParams

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart_cpu.yaml"
# A teacher trained longer than a quickstart can afford, by tools/make_quickstart_teacher.py
# (HF safetensors, ~3 MB), with the task it learned in task.json.
SHIPPED_TEACHER = Path(__file__).resolve().parent / "teacher"
METRIC_KEYS = ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "student_kl_before",
               "student_kl_after", "sft_baseline_accuracy")


def parse_args(argv: Optional[Sequence[str]], **defaults) -> argparse.Namespace:
    """The quickstart's options; `defaults` overrides some of their defaults (the demos')."""
    parser = argparse.ArgumentParser(prog="megatron_opd.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the GKD config (YAML)")
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"))
    parser.add_argument("--max-digits", type=int, default=2, help="operand digits of the addition task")
    parser.add_argument("--digit-order", choices=("little", "big"), default="little",
                        help="little: numbers written least significant digit first (learned much faster)")
    parser.add_argument("--train-rows", type=int, default=20000)
    parser.add_argument("--val-rows", type=int, default=256)
    parser.add_argument("--teacher", default="auto",
                        help="auto: the shipped teacher when it learned this task, else train one; "
                             "train: always train one; or a path to a teacher (HF dir or checkpoint)")
    parser.add_argument("--teacher-only", action="store_true",
                        help="stop after training the teacher (exported to OUT/teacher/hf)")
    parser.add_argument("--teacher-iters", type=int, default=1200)
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--teacher-batch", type=int, default=128, help="global batch of the teacher's SFT")
    parser.add_argument("--teacher-tp", type=int, default=1,
                        help="TP of the teacher's SFT (the other ranks are data-parallel: faster for a tiny model)")
    parser.add_argument("--teacher-size", default="128,4,4,2,384",
                        help="hidden,layers,heads,kv_heads,ffn of the teacher")
    parser.add_argument("--student-warmup-iters", type=int, default=400,
                        help="SFT steps that give the student the answer format before GKD and the baseline "
                             "start from it (on-policy samples of a random model teach nothing); 0: none")
    parser.add_argument("--student-warmup-lr", type=float, default=3e-3,
                        help="peak LR of the warm-up (cosine to a tenth), independent of the method's LR")
    parser.add_argument("--student-warmup-batch", type=int, default=64, help="global batch of the warm-up")
    parser.add_argument("--student-size", default="64,2,2,2,128", help="hidden,layers,heads,kv_heads,ffn of the student")
    parser.add_argument("--engine", choices=("megatron", "vllm"), default="megatron",
                        help="what samples the method's on-policy responses (rollout.engine); vllm needs "
                             "`make vllm-setup` on CPU")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the GKD config")
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> None:
    """Data, tokenizer and the two random models (kept when present: a rerun reuses them)."""
    out = args.out
    if not (out / "data" / "val.jsonl").is_file():
        write_dataset(out / "data", AdditionTask(max_digits=args.max_digits, seed=0,
                                                      little_endian=args.digit_order == "little"), args.train_rows, args.val_rows)
    tokenizer = write_tokenizer(out / "tokenizer")
    for name, size, seed in (("teacher_init", args.teacher_size, 1), ("student_init", args.student_size, 2)):
        if not (out / name / "config.json").is_file():
            hidden, layers, heads, kv_heads, ffn = (int(value) for value in size.split(","))
            write_random_model(out / name, tokenizer, hidden_size=hidden, num_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=ffn,
                               seed=seed)
    for stage in ("student_warmup", "gkd", "sft_baseline"):  # trained from scratch on every run
        shutil.rmtree(out / stage, ignore_errors=True)


def shipped_teacher_matches(args: argparse.Namespace) -> bool:
    """Whether the shipped teacher learned the task this run asks for."""
    info = SHIPPED_TEACHER / "task.json"
    if not info.is_file():
        return False
    task = json.loads(info.read_text())["task"]
    return task == {"max_digits": args.max_digits, "digit_order": args.digit_order, "seed": 0}


def stage_config(args: argparse.Namespace, *fields: str) -> JobConfig:
    out = args.out.resolve()
    paths = [f"data.dataset=[{out / 'data' / 'train.jsonl'}]", f"data.val_dataset=[{out / 'data' / 'val.jsonl'}]",
             f"data.tokenizer={out / 'tokenizer'}", f"model={out / 'student_init'}"]
    # The engine applies to every stage (the SFT ones never sample), so that overrides that
    # need it (rollout_importance_sampling_cap) hold for every stage's config.
    return load_job_config(args.config, [*paths, f"training.output_dir={out / 'gkd'}", f"rollout.engine={args.engine}",
                                         *args.overrides, *fields])


def greedy_accuracy(model: torch.nn.Module, tokenizer, vocab_size: int, rows: list[dict],
                    little_endian: bool) -> float:
    """Exact-match accuracy of greedy completions of `rows`' prompts (all ranks take part)."""
    prompts = [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in rows]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, eos_token_ids=(tokenizer.eos_token_id,))
    rollout = MegatronSampler(model, vocab_size).generate(prompts, params)
    completions = [tokenizer.decode(ids, skip_special_tokens=True) for ids in rollout.completions]
    return score([row["prompt"] for row in rows], completions, little_endian)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def forward_kl(trainer) -> float:
    """Held-out KL(teacher || student) per answer token at temperature 1."""
    loss = GKDLoss(beta=0.0, temperature=1.0, sft_alpha=0.0, topk=None, vocab_size=trainer.vocab_size)
    return trainer.evaluate(loss=loss).get("divergence", float("nan"))


class Stages:
    """The stages of one quickstart or demo run on this process group: each a `Trainer`
    at its own layout, timed, with progress lines from rank 0."""

    def __init__(self, args: argparse.Namespace, config: JobConfig):
        from megatron_opd.runtime import initialize_runtime

        self.args = args
        self.started = time.monotonic()
        self.runtime = initialize_runtime(config.parallel)
        self.rank_zero = self.runtime.rank == 0
        self.global_batch_size = config.training.global_batch_size
        self.seconds: dict = {}

    def say(self, message: str) -> None:
        if self.rank_zero:
            print(f"[quickstart {time.monotonic() - self.started:5.0f}s] {message}", flush=True)

    def run(self, name: str, config: JobConfig, before=None, after=None) -> None:
        from megatron.core import parallel_state

        from megatron_opd.runtime import initialize_runtime
        from megatron_opd.trainer.trainer import Trainer

        stage_started = time.monotonic()
        parallel = config.parallel
        self.say(f"{name}: {config.algorithm}, {config.training.train_iters} steps at "
                 f"TP={parallel.tensor_model_parallel_size} -> {config.training.output_dir}")
        # Megatron's parallel groups are global: switch them when a stage has its own layout.
        if parallel_state.get_tensor_model_parallel_world_size() != parallel.tensor_model_parallel_size:
            parallel_state.destroy_model_parallel()
        trainer = Trainer(config, initialize_runtime(parallel))
        if before is not None:
            before(trainer)
        try:
            trainer.train()
            if after is not None:
                after(trainer)
        finally:
            trainer.close()
        del trainer
        gc.collect()
        self.seconds[name] = round(time.monotonic() - stage_started, 1)

    def data_parallel(self, tp: int, global_batch: Optional[int] = None) -> list[str]:
        """Overrides for a stage at TP=`tp`, the other ranks data-parallel, one microbatch each."""
        global_batch = global_batch or self.global_batch_size
        micro = global_batch * tp // self.runtime.world_size
        return [f"parallel.tensor_model_parallel_size={tp}", f"training.global_batch_size={global_batch}",
                f"training.micro_batch_size={micro}"]

    def warm_up_student(self, *fields: str) -> Path:
        """The student after its SFT warm-up (the initial one without), as a checkpoint path."""
        args = self.args
        if not args.student_warmup_iters:
            return args.out.resolve() / "student_init"
        warmup_dir = args.out.resolve() / "student_warmup"
        self.run("student_warmup", stage_config(
            args, "algorithm=sft", "teacher_model=null", "teacher=model", "opsd_clip=null", "reward_funcs=[]",
            "rollout_importance_sampling_cap=null",
            f"training.output_dir={warmup_dir}",
            f"training.train_iters={args.student_warmup_iters}", f"optimizer.lr={args.student_warmup_lr}",
            f"optimizer.min_lr={args.student_warmup_lr / 10}", *self.data_parallel(args.teacher_tp, args.student_warmup_batch), *fields))
        return warmup_dir / "checkpoints" / f"iter_{args.student_warmup_iters:07d}"

    def write_metrics(self, metrics: dict, text: str) -> None:
        metrics["seconds"] = {**self.seconds, "total": round(time.monotonic() - self.started, 1)}
        if self.rank_zero:
            (self.args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            print(text, flush=True)
            print(f"wrote {self.args.out / 'metrics.json'}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    gkd_config = stage_config(args)
    stages = Stages(args, gkd_config)
    say, run_stage, data_parallel = stages.say, stages.run, stages.data_parallel
    if stages.rank_zero:
        prepare(args)
    torch.distributed.barrier()
    val_rows = read_rows(args.out / "data" / "val.jsonl")
    metrics: dict = {}

    def accuracy(trainer) -> float:
        return greedy_accuracy(trainer.model, trainer.tokenizer, trainer.vocab_size, val_rows,
                               args.digit_order == "little")

    if args.teacher == "train" or args.teacher_only or (args.teacher == "auto" and not shipped_teacher_matches(args)):
        teacher_dir = args.out.resolve() / "teacher"
        teacher_config = stage_config(args, "algorithm=sft", f"model={args.out.resolve() / 'teacher_init'}",
                                      "teacher_model=null", f"training.output_dir={teacher_dir}",
                                      f"training.train_iters={args.teacher_iters}", f"optimizer.lr={args.teacher_lr}",
                                      f"optimizer.min_lr={args.teacher_lr / 10}",
                                      *data_parallel(args.teacher_tp, args.teacher_batch),
                                      f"training.export_hf={str(args.teacher_only).lower()}")
        if args.teacher_only:
            run_stage("teacher", teacher_config, after=lambda t: metrics.update(teacher_accuracy=accuracy(t)))
            say(f"teacher accuracy {metrics['teacher_accuracy']:.3f}")
            stages.write_metrics(metrics, f"teacher accuracy {metrics['teacher_accuracy']:.3f}")
            return 0
        run_stage("teacher", teacher_config)
        teacher_checkpoint = teacher_dir / "checkpoints" / f"iter_{args.teacher_iters:07d}"
    else:
        teacher_checkpoint = SHIPPED_TEACHER if args.teacher == "auto" else Path(args.teacher).resolve()
        say(f"teacher: {teacher_checkpoint}")

    student = stages.warm_up_student()
    gkd_config = stage_config(args, f"teacher_model={teacher_checkpoint}", f"model={student}")

    def before_gkd(trainer) -> None:
        with trainer.teacher.on_device() as teacher:
            metrics["teacher_accuracy"] = greedy_accuracy(teacher, trainer.tokenizer, trainer.vocab_size, val_rows,
                                                          args.digit_order == "little")
        metrics.update(student_accuracy_before=accuracy(trainer), student_kl_before=forward_kl(trainer))
        say(f"teacher accuracy {metrics['teacher_accuracy']:.3f}; student before: accuracy "
            f"{metrics['student_accuracy_before']:.3f}, KL {metrics['student_kl_before']:.3f}")

    def after_gkd(trainer) -> None:
        metrics.update(student_accuracy_after=accuracy(trainer), student_kl_after=forward_kl(trainer))

    run_stage("gkd", gkd_config, before=before_gkd, after=after_gkd)
    say(f"student after GKD: accuracy {metrics['student_accuracy_after']:.3f}, KL {metrics['student_kl_after']:.3f}")

    sft_config = stage_config(args, "algorithm=sft", "teacher_model=null", f"model={student}",
                              f"training.output_dir={args.out.resolve() / 'sft_baseline'}")
    run_stage("sft_baseline", sft_config, after=lambda t: metrics.update(sft_baseline_accuracy=accuracy(t)))

    metrics["settings"] = {"lmbda": gkd_config.lmbda, "beta": gkd_config.beta, "rollout_engine": args.engine,
                           "train_iters":
                           gkd_config.training.train_iters, "tensor_model_parallel_size":
                           gkd_config.parallel.tensor_model_parallel_size, "val_prompts": len(val_rows),
                           "teacher": str(teacher_checkpoint)}
    stages.write_metrics(metrics, table(metrics))
    return 0 if metrics["student_accuracy_after"] > metrics["student_accuracy_before"] else 1


def table(metrics: dict) -> str:
    rows = [("teacher (SFT)", metrics["teacher_accuracy"], None),
            ("student before", metrics["student_accuracy_before"], metrics["student_kl_before"]),
            ("student after GKD", metrics["student_accuracy_after"], metrics["student_kl_after"]),
            ("student after SFT (baseline)", metrics["sft_baseline_accuracy"], None)]
    lines = [f"{'model':<30}{'accuracy':>10}{'KL(T||S)':>10}", "-" * 50]
    for name, accuracy, kl in rows:
        lines.append(f"{name:<30}{accuracy:>10.3f}{'' if kl is None else f'{kl:.3f}':>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
