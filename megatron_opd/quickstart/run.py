"""The CPU quickstart: what distillation buys over SFT, at the same steps from the same student.

    torchrun --nproc-per-node 2 -m megatron_opd.quickstart --out outputs/quickstart

Stages, all through the real `Trainer` (the arms at the layout of `configs/quickstart_cpu.yaml`,
TP=2 on two gloo ranks; the SFT warm-up and teacher stages at TP=1 x DP=2, faster for tiny models):
  1. data (`quickstart.task`: by default `PermutationTask`, any ordering of a prompt's digits is
     right, the reference one of them; a small budget of training prompts), a character
     tokenizer and two randomly initialized Llama models, a teacher and a smaller student;
  2. the teacher: the shipped one (`SHIPPED_TEACHER`, when it learned this task), or one
     trained here with SFT (`--teacher train`; reused when a previous run finished it);
  3. the student gets a short SFT warm-up (on-policy steps learn from the student's own
     samples, which say nothing while they are noise);
  4. the arms (`ARMS`), each from the warmed-up student for the config's steps on the same
     training prompts: SFT on the reference answers (its own LR, `--sft-lr`), off-policy KD
     (lmbda 0), on-policy GKD (the config's lmbda) and prompts only (lmbda 1, a data file
     without answers); each evaluated on the held-out prompts at step 0, every
     train_iters / `--eval-points` steps and at the end (greedy accuracy, KL(teacher || student));
  5. a table on stdout, `metrics.json` (final numbers, curves, seconds) and `quickstart.png`
     (`plot.py`, when matplotlib is installed) in the output dir.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from megatron_opd.quickstart.task import (
    AdditionTask,
    PermutationTask,
    write_dataset,
    write_random_model,
    write_tokenizer,
)
from megatron_opd.rollout import MegatronSampler, SamplingParams

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart_cpu.yaml"
# A teacher trained longer than a quickstart can afford, by tools/make_quickstart_teacher.py
# (HF safetensors, ~3 MB), with the tasks it learned in task.json.
SHIPPED_TEACHER = Path(__file__).resolve().parent / "teacher"
TASKS = ("permute", "addition")
# Greedy evaluation's answer length: a 5-digit permutation or a 3-digit sum, EOS, and slack.
MAX_ANSWER_TOKENS = 10


def parse_args(argv: Optional[Sequence[str]], **defaults) -> argparse.Namespace:
    """The quickstart's options; `defaults` overrides some of their defaults (the demos')."""
    parser = argparse.ArgumentParser(prog="megatron_opd.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the GKD config (YAML)")
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"))
    parser.add_argument("--task", choices=TASKS, default="permute",
                        help="permute: any ordering of a prompt's digits is right (several right answers, the "
                             "teacher's distribution says which); addition: one right answer")
    parser.add_argument("--min-digits", type=int, default=3, help="permute: fewest digits in a prompt")
    parser.add_argument("--max-digits", type=int, default=None,
                        help="permute: most digits in a prompt (default 5); addition: operand digits (default 2)")
    parser.add_argument("--digit-order", choices=("little", "big"), default="little",
                        help="little: numbers written least significant digit first (learned much faster)")
    parser.add_argument("--train-rows", type=int, default=500,
                        help="training prompts (with a reference answer each): every arm's data budget")
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
    parser.add_argument("--student-warmup-iters", type=int, default=60,
                        help="SFT steps that give the student the answer format before GKD and the baseline "
                             "start from it (on-policy samples of a random model teach nothing); 0: none")
    parser.add_argument("--student-warmup-lr", type=float, default=3e-3,
                        help="peak LR of the warm-up (cosine to a tenth), independent of the method's LR")
    parser.add_argument("--student-warmup-batch", type=int, default=64, help="global batch of the warm-up")
    parser.add_argument("--student-size", default="64,2,2,2,128", help="hidden,layers,heads,kv_heads,ffn of the student")
    parser.add_argument("--engine", choices=("megatron", "vllm"), default="megatron",
                        help="what samples the method's on-policy responses (rollout.engine); vllm needs "
                             "`make vllm-setup` on CPU")
    parser.add_argument("--sft-lr", type=float, default=1e-3,
                        help="peak LR of the SFT arm, its best of 1e-3, 3e-3, 1e-2 (the distillation arms take "
                             "optimizer.lr of the config, 3e-3, untuned)")
    parser.add_argument("--eval-points", type=int, default=5,
                        help="held-out evaluations per arm after step 0 (every train_iters / N steps)")
    parser.add_argument("--arms", type=arm_names, default=None,
                        help=f"comma-separated arms to run, of {','.join(name for name, _, _ in ARMS)} (default: all)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the GKD config")
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def arm_names(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    known = [name for name, _, _ in ARMS]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"arms must be a comma-separated list of {known}, got {text!r}")
    return names


def prepare(args: argparse.Namespace) -> None:
    """Data, tokenizer and the two random models (kept when present: a rerun reuses them)."""
    out = args.out
    if not (out / "data" / "val.jsonl").is_file():
        write_dataset(out / "data", make_task(args), args.train_rows, args.val_rows)
    tokenizer = write_tokenizer(out / "tokenizer")
    for name, size, seed in (("teacher_init", args.teacher_size, 1), ("student_init", args.student_size, 2)):
        if not (out / name / "config.json").is_file():
            hidden, layers, heads, kv_heads, ffn = (int(value) for value in size.split(","))
            write_random_model(out / name, tokenizer, hidden_size=hidden, num_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=ffn,
                               seed=seed)
    for stage in ("student_warmup", *(name for name, _, _ in ARMS)):  # trained from scratch on every run
        shutil.rmtree(out / stage, ignore_errors=True)


def shipped_teacher_matches(args: argparse.Namespace) -> bool:
    """Whether the shipped teacher learned the task this run asks for."""
    info = SHIPPED_TEACHER / "task.json"
    if not info.is_file():
        return False
    return task_description(args) in json.loads(info.read_text())["tasks"]


def make_task(args: argparse.Namespace):
    """The task `args` ask for: a `PermutationTask` or an `AdditionTask`."""
    if args.task == "permute":
        return PermutationTask(min_digits=args.min_digits, max_digits=args.max_digits or 5, seed=0)
    return AdditionTask(max_digits=args.max_digits or 2, seed=0, little_endian=args.digit_order == "little")


def task_description(args: argparse.Namespace) -> dict:
    """The task as the shipped teacher's task.json lists the ones it learned."""
    if args.task == "permute":
        return {"task": "permute", "min_digits": args.min_digits, "max_digits": args.max_digits or 5, "seed": 0}
    return {"task": "addition", "max_digits": args.max_digits or 2, "digit_order": args.digit_order, "seed": 0}


def stage_config(args: argparse.Namespace, *fields: str) -> JobConfig:
    out = args.out.resolve()
    paths = [f"data.dataset=[{out / 'data' / 'train.jsonl'}]", f"data.val_dataset=[{out / 'data' / 'val.jsonl'}]",
             f"data.tokenizer={out / 'tokenizer'}", f"model={out / 'student_init'}"]
    # The engine applies to every stage (the SFT ones never sample), so that overrides that
    # need it (rollout_importance_sampling_cap) hold for every stage's config.
    return load_job_config(args.config, [*paths, f"training.output_dir={out / 'gkd'}", f"rollout.engine={args.engine}",
                                         *args.overrides, *fields])


def greedy_accuracy(model: torch.nn.Module, tokenizer, vocab_size: int, rows: list[dict], task) -> float:
    """`task.score` of greedy completions of `rows`' prompts (all ranks take part)."""
    prompts = [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in rows]
    params = SamplingParams(max_new_tokens=MAX_ANSWER_TOKENS, temperature=0.0, eos_token_ids=(tokenizer.eos_token_id,))
    rollout = MegatronSampler(model, vocab_size).generate(prompts, params)
    completions = [tokenizer.decode(ids, skip_special_tokens=True) for ids in rollout.completions]
    return task.score([row["prompt"] for row in rows], completions)


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
        self.train_seconds: dict = {}  # without the periodic evaluations
        self.cpu_seconds: dict = {}  # summed over ranks

    def say(self, message: str) -> None:
        if self.rank_zero:
            print(f"[quickstart {time.monotonic() - self.started:5.0f}s] {message}", flush=True)

    def run(self, name: str, config: JobConfig, before=None, after=None, evaluate=None,
            evaluate_every: int = 0) -> None:
        """Train stage `name`. With `evaluate`: called at step 0, every `evaluate_every` steps
        and at the end (its time is the stage's, not in `train_seconds`); no checkpoint is saved."""
        from megatron.core import parallel_state

        from megatron_opd.runtime import initialize_runtime
        from megatron_opd.trainer.trainer import Trainer

        stage_started, cpu_started = time.monotonic(), time.process_time()
        parallel = config.parallel
        self.say(f"{name}: {config.algorithm}, {config.training.train_iters} steps at "
                 f"TP={parallel.tensor_model_parallel_size} -> {config.training.output_dir}")
        # Megatron's parallel groups are global: switch them when a stage has its own layout.
        if parallel_state.get_tensor_model_parallel_world_size() != parallel.tensor_model_parallel_size:
            parallel_state.destroy_model_parallel()
        trainer = Trainer(config, initialize_runtime(parallel))
        evaluating = 0.0
        if before is not None:
            before(trainer)
        try:
            if evaluate is None:
                trainer.train()
            else:
                evaluating = self._train_evaluating(trainer, evaluate, evaluate_every)
            if after is not None:
                after(trainer)
        finally:
            trainer.close()
        del trainer
        gc.collect()
        self.seconds[name] = round(time.monotonic() - stage_started, 1)
        self.train_seconds[name] = round(self.seconds[name] - evaluating, 1)
        # CPU time of all ranks (this process's threads; what a loaded machine does not inflate)
        cpu = torch.tensor([time.process_time() - cpu_started], dtype=torch.float64)
        torch.distributed.all_reduce(cpu)
        self.cpu_seconds[name] = round(float(cpu), 1)

    @staticmethod
    def _train_evaluating(trainer, evaluate, every: int) -> float:
        """The trainer's steps with `evaluate(trainer)` at step 0, each `every` steps and at
        the end; returns the seconds spent evaluating."""
        training = trainer.config.training
        evaluating = 0.0

        def timed_evaluate() -> None:
            nonlocal evaluating
            started = time.monotonic()
            evaluate(trainer)
            evaluating += time.monotonic() - started

        timed_evaluate()
        while trainer.iteration < training.train_iters:
            last = trainer.train_step()
            if last and trainer.iteration % training.log_interval == 0:
                trainer.metrics.log(trainer.iteration, last)
            if trainer.iteration % every == 0 or trainer.iteration == training.train_iters:
                timed_evaluate()
        trainer.metrics.close()
        return evaluating

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
        metrics["cpu_seconds"] = {**self.cpu_seconds, "total": round(sum(self.cpu_seconds.values()), 1)}
        if self.rank_zero:
            (self.args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            print(text, flush=True)
            print(f"wrote {self.args.out / 'metrics.json'}", flush=True)


# The arms, each from the same warmed-up student for the same steps on the same training
# prompts: (name, label, overrides of the GKD config). The SFT arm has its own LR (`--sft-lr`).
ARMS = (
    ("sft", "SFT on the reference answers", ("algorithm=sft", "teacher_model=null")),
    ("kd", "off-policy KD (lmbda 0)", ("lmbda=0.0",)),
    ("gkd", "on-policy GKD (lmbda from the YAML)", ()),
    ("prompts_only", "on-policy, prompts only (lmbda 1)", ("lmbda=1.0", "data.allow_prompt_only=true")),
)


def held_out_kl(trainer, teacher) -> float:
    """`forward_kl` with `teacher` lent to a trainer that has none (the SFT arm): the same
    held-out KL(teacher || student) for every arm."""
    context = trainer.context
    if context.teacher is not None:
        return forward_kl(trainer)
    context.teacher = teacher
    try:
        return forward_kl(trainer)
    finally:
        context.teacher = None


def load_teacher(trainer, path: Path):
    """The teacher at `path` at `trainer`'s layout, for held-out evaluation only."""
    from megatron_opd.checkpoint.pretrained import load_pretrained
    from megatron_opd.checkpoint.run_models import resolve_models
    from megatron_opd.teachers import LocalTeacher

    config = dataclasses.replace(trainer.config, algorithm="gkd", teacher_model=str(path))
    source = resolve_models(config).teacher
    # The student's padded vocab (its checkpoint's, when it was saved at another TP): one shard size
    padded = trainer.student_source.model.padded_vocab_size(config.parallel.tensor_model_parallel_size)
    model = load_pretrained(source, trainer.runtime, "teacher", trainer.dtype, pad_vocab_size_to=padded,
                            compute=config.compute)
    return LocalTeacher(model)


def write_prompts_only(path: Path, target: Path) -> Path:
    """`path`'s rows without their reference completions (the prompts-only arm's data)."""
    target.write_text("".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in read_rows(path)))
    return target


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    gkd_config = stage_config(args)
    stages = Stages(args, gkd_config)
    say, run_stage, data_parallel = stages.say, stages.run, stages.data_parallel
    out = args.out.resolve()
    if stages.rank_zero:
        prepare(args)
        write_prompts_only(out / "data" / "train.jsonl", out / "data" / "train_prompts.jsonl")
    torch.distributed.barrier()
    val_rows = read_rows(args.out / "data" / "val.jsonl")
    task = make_task(args)
    metrics: dict = {}

    def accuracy(trainer) -> float:
        return greedy_accuracy(trainer.model, trainer.tokenizer, trainer.vocab_size, val_rows, task)

    if args.teacher == "train" or args.teacher_only or (args.teacher == "auto" and not shipped_teacher_matches(args)):
        teacher_dir = out / "teacher"
        teacher_config = stage_config(args, "algorithm=sft", f"model={out / 'teacher_init'}",
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
    steps = gkd_config.training.train_iters
    every = max(1, steps // args.eval_points)
    arms: dict = {}
    for name, label, fields in ARMS:
        if args.arms and name not in args.arms:
            continue
        arm_fields = [f"teacher_model={teacher_checkpoint}", f"model={student}", *fields,
                      f"training.output_dir={out / name}"]
        if name == "sft":
            arm_fields += [f"optimizer.lr={args.sft_lr}", f"optimizer.min_lr={args.sft_lr / 10}"]
        if name == "prompts_only":
            arm_fields.append(f"data.dataset=[{out / 'data' / 'train_prompts.jsonl'}]")
        config = stage_config(args, *arm_fields)
        curve: dict = {"step": [], "accuracy": [], "kl": []}
        arm = arms[name] = {"label": label, "algorithm": config.algorithm, "lr": config.optimizer.lr,
                            "curve": curve}
        if config.algorithm == "gkd":
            arm.update(lmbda=config.lmbda, beta=config.beta, temperature=config.temperature)
        teacher = []

        def evaluate(trainer, curve=curve, teacher=teacher) -> None:
            if trainer.context.teacher is None and not teacher:
                teacher.append(load_teacher(trainer, teacher_checkpoint))
            if "teacher_accuracy" not in metrics:
                source = trainer.teacher or teacher[0]
                with source.on_device() as model:
                    metrics["teacher_accuracy"] = greedy_accuracy(model, trainer.tokenizer, trainer.vocab_size,
                                                                  val_rows, task)
            if trainer.iteration == 0 and "student_accuracy_before" in metrics:  # the same warmed-up student
                point = (metrics["student_accuracy_before"], metrics["student_kl_before"])
            else:
                point = (accuracy(trainer), held_out_kl(trainer, teacher[0] if teacher else None))
            if trainer.iteration == 0:
                metrics.update(student_accuracy_before=point[0], student_kl_before=point[1])
            curve["step"].append(trainer.iteration)
            curve["accuracy"].append(point[0])
            curve["kl"].append(point[1])
            say(f"{name} step {trainer.iteration}: held-out accuracy {point[0]:.3f}, KL {point[1]:.3f}")

        run_stage(name, config, evaluate=evaluate, evaluate_every=every)
        arm.update(accuracy=curve["accuracy"][-1], kl=curve["kl"][-1], seconds=stages.seconds[name],
                   train_seconds=stages.train_seconds[name], cpu_seconds=stages.cpu_seconds[name])

    metrics["arms"] = arms
    if "gkd" in arms:  # the headline keys of earlier versions
        metrics.update(student_accuracy_after=arms["gkd"]["accuracy"], student_kl_after=arms["gkd"]["kl"])
    if "sft" in arms:
        metrics["sft_baseline_accuracy"] = arms["sft"]["accuracy"]
    metrics["settings"] = {"task": task_description(args), "lmbda": gkd_config.lmbda, "beta": gkd_config.beta,
                           "temperature": gkd_config.temperature, "lr": gkd_config.optimizer.lr,
                           "sft_lr": args.sft_lr, "rollout_engine": args.engine, "train_iters": steps,
                           "eval_every": every, "warmup_iters": args.student_warmup_iters,
                           "tensor_model_parallel_size": gkd_config.parallel.tensor_model_parallel_size,
                           "val_prompts": len(val_rows), "teacher": str(teacher_checkpoint)}
    stages.write_metrics(metrics, table(metrics))
    if stages.rank_zero:
        from megatron_opd.quickstart.plot import plot_curves

        written = plot_curves(metrics, args.out / "quickstart.png")
        print(f"wrote {written}" if written else "matplotlib is not installed (pip install -e '.[quickstart]'): "
              "no plot, the curves are in metrics.json", flush=True)
    distilled = [arms[name]["accuracy"] for name in ("kd", "gkd", "prompts_only") if name in arms]
    return 0 if distilled and max(distilled) > metrics["student_accuracy_before"] else 1


def table(metrics: dict) -> str:
    lines = [f"{'model':<42}{'accuracy':>10}{'KL(T||S)':>10}{'seconds':>9}", "-" * 71,
             f"{'teacher':<42}{metrics['teacher_accuracy']:>10.3f}",
             f"{'student before (after its warm-up)':<42}{metrics['student_accuracy_before']:>10.3f}"
             f"{metrics['student_kl_before']:>10.3f}"]
    for name, arm in metrics["arms"].items():
        label = arm["label"].replace("from the YAML", str(arm.get("lmbda")))
        lines.append(f"{label:<42}{arm['accuracy']:>10.3f}{arm['kl']:>10.3f}{arm['train_seconds']:>9.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
