"""A GKD training step against TRL's own `GKDTrainer`, side by side on the same models and data.

    python tools/bench_train.py --against trl                     # the quickstart's shapes
    python tools/bench_train.py --against trl --lmbdas 0,0.5 --rounds 5 --steps 20
    python tools/bench_train.py --against trl --preset qwen2.5-0.5b-from-1.5b --steps 2 --rounds 1

Both sides get the same random Llama teacher and student (HF directories written by
`bench_train.write_inputs`), the same rows (a prompt and a completion of random words; TRL
reads them as two chat messages through a template that reproduces our raw format exactly:
prompt ids, completion ids, EOS), the same global batch, lr, Adam betas, gradient clipping,
beta, temperature and completion length, fp32, one process, one intra-op thread, and the same
activation recomputation (`--gradient-checkpointing`: TRL's `gradient_checkpointing`, on by
default in TRL's configs, against our `compute.recompute_granularity: full` of every layer).

Each (side, lmbda) pair runs in its own fresh subprocess; the pairs are alternated within a
round and the order of the sides flips every round, so slow phases of a loaded machine hit
both. A child reports, for its steps after --warmup:
  tokens      loss tokens (response tokens incl. EOS; the same count on both sides for
              dataset responses; sampled ones stop at EOS or the completion length)
  cpu_s       `time.process_time()` across the steps (all threads of the process)
  wall_s      wall-clock seconds across the steps
and separately `startup_s` (process spawn to the first step: imports, model loading, set-up),
its peak RSS over the whole run (`peak_rss_gib`; loading may set it), and what the measured
steps need on top of what the process holds between steps (`step_extra_gib`: the peak RSS of the
measured steps, from Linux's VmHWM reset when they start, minus the RSS then; after the warm-up
steps both sides hold their weights, gradients and optimizer state, so this is the step's
activations, logits and loss temporaries). The report gives per lmbda the medians over rounds of
tokens per CPU-second and their ratio (ours / TRL's), start-up, peak RSS and step memory.

TRL is an optional benchmark dependency (`pip install trl accelerate --no-deps` into the
venv; TRL 1.x keeps GKD under `trl.experimental.gkd`), never a test dependency.
TRL's step is measured by its own `Trainer.train()` with a callback; the only addition is a
subclass that counts the loss tokens its `compute_loss` receives.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Reproduces `prompt_format: raw` under TRL's ChatML collator: "prompt " is the formatted
# prompt, "prompt completion w0" the full text; the whitespace word-level tokenizer turns
# them into the prompt's ids and the prompt's + completion's + EOS ("w0", id 0).
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['content'] }} {% endfor %}"
                 "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}")
QUICKSTART_SHAPES = {"student": "64,2,2,2,128", "teacher": "128,4,4,2,384", "vocab": 32, "prompt_len": 6,
                     "completion_len": 4, "batch": 64, "micro_batch": 64}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lmbdas", default="0,0.5", help="comma-separated GKD lmbda values to compare at")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (medians over them)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"], default="off",
                        help="recompute every layer's activations in the backward, on both sides (TRL's default: on)")


def run_comparison(args: argparse.Namespace, write_inputs) -> dict:
    """Writes the inputs once, then alternates the sides in fresh subprocesses."""
    paths = write_inputs(args)
    write_trl_dataset(paths)
    lmbdas = [float(value) for value in args.lmbdas.split(",")]
    runs: dict = {str(lmbda): {"ours": [], "trl": []} for lmbda in lmbdas}
    for round_index in range(args.rounds):
        sides = ("ours", "trl") if round_index % 2 == 0 else ("trl", "ours")
        for lmbda in lmbdas:
            for side in sides:
                result = run_child(side, lmbda, args, paths)
                runs[str(lmbda)][side].append(result)
                print(f"round {round_index + 1}/{args.rounds} lmbda {lmbda} {side}: "
                      f"{result['tokens'] / result['cpu_s']:.0f} tokens/CPU-s, start-up {result['startup_s']:.1f} s, "
                      f"peak RSS {result['peak_rss_gib']:.2f} GiB, step memory {result['step_extra_gib']:.2f} GiB",
                      flush=True)
    summary = {lmbda: summarize(sides) for lmbda, sides in runs.items()}
    return {"runs": runs, "summary": summary}


def summarize(sides: dict) -> dict:
    def median(side: str, key) -> float:
        return statistics.median(key(run) for run in sides[side])

    row = {}
    for side in ("ours", "trl"):
        row[side] = {"tokens_per_cpu_s": median(side, lambda run: run["tokens"] / run["cpu_s"]),
                     "tokens_per_s": median(side, lambda run: run["tokens"] / run["wall_s"]),
                     "startup_s": median(side, lambda run: run["startup_s"]),
                     "peak_rss_gib": median(side, lambda run: run["peak_rss_gib"]),
                     "step_extra_gib": median(side, lambda run: run["step_extra_gib"]),
                     "tokens_per_step": median(side, lambda run: run["tokens"] / run["steps"])}
    # The ratio of each round's pair (same load), then the median over rounds.
    row["ratio_tokens_per_cpu_s"] = statistics.median(
        (ours["tokens"] / ours["cpu_s"]) / (trl["tokens"] / trl["cpu_s"])
        for ours, trl in zip(sides["ours"], sides["trl"]))
    # TRL's clock from on_step_begin to on_step_end, without its batch collation: shown, not compared.
    row["trl"]["window_tokens_per_cpu_s"] = median("trl", lambda run: run["tokens"] / run["window_cpu_s"])
    row["ratio_peak_rss"] = row["trl"]["peak_rss_gib"] / row["ours"]["peak_rss_gib"]
    row["ratio_step_extra"] = row["trl"]["step_extra_gib"] / max(row["ours"]["step_extra_gib"], 1e-3)
    return row


def print_report(summary: dict) -> None:
    print(f"\n{'lmbda':<7}{'side':<6}{'tok/CPU-s':>11}{'tok/s':>9}{'tok/step':>10}{'start-up s':>12}{'peak GiB':>10}"
          f"{'step GiB':>10}")
    for lmbda, row in summary.items():
        for side in ("ours", "trl"):
            numbers = row[side]
            print(f"{lmbda:<7}{side:<6}{numbers['tokens_per_cpu_s']:>11.0f}{numbers['tokens_per_s']:>9.0f}"
                  f"{numbers['tokens_per_step']:>10.0f}{numbers['startup_s']:>12.1f}{numbers['peak_rss_gib']:>10.2f}"
                  f"{numbers['step_extra_gib']:>10.2f}")
        print(f"{lmbda:<7}TRL between on_step_begin and on_step_end only (no batch collation): "
              f"{row['trl']['window_tokens_per_cpu_s']:.0f} tok/CPU-s")
        print(f"{lmbda:<7}ours / TRL: {row['ratio_tokens_per_cpu_s']:.2f}x tokens per CPU-second (median of the "
              f"rounds' ratios), {row['ratio_peak_rss']:.2f}x less peak RSS, {row['ratio_step_extra']:.2f}x less "
              f"step memory")


def write_trl_dataset(paths: dict) -> None:
    """The rows as two chat messages, and the tokenizer with `CHAT_TEMPLATE`, for TRL."""
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in Path(paths["data"]).read_text().splitlines()]
    messages_path = Path(paths["data"]).with_name("train_messages.jsonl")
    with open(messages_path, "w") as handle:
        for row in rows:
            handle.write(json.dumps({"messages": [{"role": "user", "content": row["prompt"]},
                                                  {"role": "assistant", "content": row["completion"]}]}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(Path(paths["tokenizer"]).with_name("tokenizer_chat"))
    paths["trl_data"], paths["trl_tokenizer"] = messages_path, Path(paths["tokenizer"]).with_name("tokenizer_chat")


def run_child(side: str, lmbda: float, args: argparse.Namespace, paths: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1", "MEGATRON_OPD_DEVICE": "cpu"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    spec = {"side": side, "lmbda": lmbda, "paths": {key: str(value) for key, value in paths.items()},
            "batch": args.batch, "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup,
            "prompt_len": args.prompt_len, "completion_len": args.completion_len, "lr": args.lr,
            "recompute": args.gradient_checkpointing == "on",
            "workdir": str(args.workdir / f"{side}_lmbda{lmbda}")}
    with tempfile.TemporaryDirectory() as scratch:
        result_path = Path(scratch) / "result.json"
        spawned = time.time()
        subprocess.run([sys.executable, __file__, json.dumps(spec), str(result_path)], env=env, check=True,
                       cwd=ROOT)
        result = json.loads(result_path.read_text())
    result["startup_s"] = result.pop("first_step_at") - spawned
    return result


# --------------------------------------------------------------------------- the children


def child_main(spec: dict, result_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    measure = ours_steps if spec["side"] == "ours" else trl_steps
    memory = StepMemory()
    # [(start time, tokens, cpu_s, wall_s[, cpu_s between TRL's on_step_begin and on_step_end]) per step]
    steps = measure(spec, memory)
    counted = steps[spec["warmup"]:]
    result = {"first_step_at": steps[0][0], "steps": len(counted), "tokens": sum(step[1] for step in counted),
              "cpu_s": sum(step[2] for step in counted), "wall_s": sum(step[3] for step in counted),
              "window_cpu_s": sum(step[-1] for step in counted) if len(counted[0]) > 4 else None,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "step_extra_gib": memory.extra_gib(), "threads": torch.get_num_threads()}
    result_path.write_text(json.dumps(result))


class StepMemory:
    """The measured steps' peak RSS above the RSS when they start (Linux: /proc/self/status,
    VmHWM reset through /proc/self/clear_refs)."""

    def __init__(self) -> None:
        self.held_gib = None

    @staticmethod
    def _status_gib(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
        raise RuntimeError(f"/proc/self/status has no {field}")

    def start(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.held_gib = self._status_gib("VmRSS")

    def extra_gib(self) -> float:
        return self._status_gib("VmHWM") - self.held_gib


def ours_steps(spec: dict, memory: StepMemory) -> list:
    from megatron_opd.config import ParallelConfig
    from megatron_opd.config.job import load_job_config
    from megatron_opd.runtime import initialize_runtime
    from megatron_opd.trainer.trainer import Trainer

    paths = spec["paths"]
    overrides = {
        "model": paths["student"], "teacher_model": paths["teacher"], "lmbda": spec["lmbda"], "beta": 0.5,
        "temperature": 1.0, "max_completion_length": spec["completion_len"], "data.dataset": f"[{paths['data']}]",
        "data.tokenizer": paths["tokenizer"], "data.prompt_format": "raw",
        "data.max_length": spec["prompt_len"] + spec["completion_len"] + 1,
        "training.train_iters": spec["warmup"] + spec["steps"], "training.micro_batch_size": spec["micro_batch"],
        "training.global_batch_size": spec["batch"], "training.output_dir": spec["workdir"],
        "training.resume": False, "training.export_hf": False, "training.tensorboard": False,
        "training.precision": "fp32", "training.log_interval": 10**6,
        "optimizer.lr": spec["lr"], "optimizer.min_lr": spec["lr"], "optimizer.lr_decay_style": "constant",
        "optimizer.lr_warmup_iters": 0, "optimizer.clip_grad": 1.0, "optimizer.weight_decay": 0.0,
        "optimizer.adam_beta1": 0.9, "optimizer.adam_beta2": 0.999,
    }
    if spec["recompute"]:
        overrides.update({"compute.recompute_granularity": "full", "compute.recompute_method": "uniform",
                          "compute.recompute_num_layers": 1})
    config = load_job_config(None, [f"{key}={value}" for key, value in overrides.items()])
    trainer = Trainer(config, initialize_runtime(ParallelConfig()))
    steps = []
    for index in range(spec["warmup"] + spec["steps"]):
        if index == spec["warmup"]:
            memory.start()
        started, cpu_started = time.time(), time.process_time()
        metrics = trainer.train_step()
        steps.append((started, int(metrics["tokens"]), time.process_time() - cpu_started, time.time() - started))
    trainer.close()
    return steps


def trl_steps(spec: dict, memory: StepMemory) -> list:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    paths = spec["paths"]
    steps: list = []

    class CountingGKDTrainer(GKDTrainer):
        """TRL's trainer, counting the loss tokens (labels != -100 after the shift) of each step."""

        step_tokens = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.step_tokens += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class StepClock(TrainerCallback):
        """Times each step from the previous step's end to this one's: the whole training loop.

        `Trainer` fetches and collates a step's batches (`DataCollatorForChatML` tokenizes the
        conversations there) before `on_step_begin`, and logs after `on_step_end`; a clock from
        begin to end would leave both out, while ours times `train_step`, which reads and collates
        its batch (tokenized once at start-up, counted in start-up)."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.cpu_started = time.time(), time.process_time()

        def on_step_begin(self, args, state, control, **kwargs):
            if len(steps) == spec["warmup"]:
                memory.start()
            trainer.step_tokens = 0
            self.cpu_begun = time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            ended, cpu_ended = time.time(), time.process_time()
            steps.append((self.started, trainer.step_tokens, cpu_ended - self.cpu_started, ended - self.started,
                          cpu_ended - self.cpu_begun))
            self.started, self.cpu_started = ended, cpu_ended

    tokenizer = AutoTokenizer.from_pretrained(paths["trl_tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(paths["student"], dtype="float32")
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype="float32")
    config = GKDConfig(
        output_dir=spec["workdir"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["batch"] // spec["micro_batch"],
        max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        lmbda=spec["lmbda"], beta=0.5, temperature=1.0, max_new_tokens=spec["completion_len"],
        max_length=spec["prompt_len"] + spec["completion_len"] + 1, use_cpu=True, bf16=False, fp16=False,
        report_to="none", save_strategy="no", logging_steps=10**6, dataloader_num_workers=0, seed=0,
        disable_tqdm=True, gradient_checkpointing=spec["recompute"])
    dataset = load_dataset("json", data_files=paths["trl_data"], split="train")
    trainer = CountingGKDTrainer(model=model, teacher_model=teacher, args=config, train_dataset=dataset,
                                 processing_class=tokenizer, callbacks=[StepClock()])
    trainer.train()
    return steps


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    child_main(json.loads(sys.argv[1]), Path(sys.argv[2]))
