"""Microbatches by fixed rows, a token budget and packed rows: padding, and tokens/s of a training step.

    python tools/bench_microbatches.py                        # padding tables + a step benchmark
    python tools/bench_microbatches.py --no-step --json out.json

1. Padding fraction (padded positions / all positions rows x (s + 1) of a step's microbatches)
   with `training.micro_batch_size` rows padded to the step's longest row (before), with
   `training.max_tokens_per_microbatch` (several budgets) and with `training.pack_sequences`
   (rows of the budget's length), planned by the trainer's own `pipeline.batching` /
   `pipeline.packing` over many steps of:
   - the quickstart's data (outputs/quickstart/data/train.jsonl if present, else generated
     with `megatron_opd.quickstart.task`), tokenized by its character tokenizer;
   - a realistic distribution: lognormal lengths clipped to 50..2048 tokens (median ~300).
2. A GKD step (off-policy, random Llama student and teacher, word tokenizer) through the
   real `Trainer` on rows of the lognormal distribution, fixed rows, a token budget and packed
   rows run in turn in one process: medians of the step's response tokens/s and of its student
   forward-backward and teacher forward seconds, and their ratios to fixed rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_opd.pipeline.batching import padded_length, plan_microbatches  # noqa: E402
from megatron_opd.pipeline.packing import pack_rows  # noqa: E402


def lognormal_lengths(count: int, seed: int, low: int = 50, high: int = 2048, median: float = 300.0,
                      sigma: float = 0.9) -> list[int]:
    generator = random.Random(seed)
    return [min(high, max(low, int(round(generator.lognormvariate(math.log(median), sigma))))) for _ in range(count)]


def quickstart_lengths(rows: int) -> list[int]:
    """Token counts of the quickstart's training rows (prompt + completion + EOS)."""
    from transformers import AutoTokenizer

    from megatron_opd.quickstart.task import PermutationTask, write_dataset, write_tokenizer

    data = ROOT / "outputs/quickstart/data/train.jsonl"
    tokenizer_dir = ROOT / "outputs/quickstart/tokenizer"
    with tempfile.TemporaryDirectory() as scratch:
        if not data.exists():
            data = write_dataset(scratch, PermutationTask(), rows, 1)["train"]
        if not tokenizer_dir.exists():
            tokenizer_dir = write_tokenizer(Path(scratch) / "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        rows_read = [json.loads(line) for line in Path(data).read_text().splitlines()[:rows]]
    return [len(tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]) + 1
            for row in rows_read]


def padding(lengths: list[int], batch: int, micro_batch_size: int, budget, multiple: int,
            packed: bool = False) -> dict:
    """Padding fraction and microbatches per step over consecutive steps of `batch` rows."""
    total = real = microbatches = 0
    for start in range(0, len(lengths) - batch + 1, batch):
        step = lengths[start:start + batch]
        if packed:  # one row per microbatch, padded at its end (`batching.make_microbatches`)
            groups = pack_rows(step, budget + 1)
            for group in groups:
                row_tokens = sum(step[row] for row in group)
                total += padded_length(row_tokens, multiple) + 1
                real += row_tokens
            microbatches += len(groups)
            continue
        groups = plan_microbatches(step, multiple, micro_batch_size, budget)
        longest = max(padded_length(length, multiple) for length in step)
        for group in groups:
            width = longest if budget is None else max(padded_length(step[row], multiple) for row in group)
            total += len(group) * (width + 1)
            real += sum(step[row] for row in group)
        microbatches += len(groups)
    steps = len(lengths) // batch
    return {"padding_fraction": 1 - real / total, "microbatches_per_step": microbatches / steps,
            "positions_per_step": total / steps}


def padding_tables(args) -> dict:
    tables = {}
    cases = {"quickstart": (quickstart_lengths(args.quickstart_rows), 64, 64, [128, 256, 512]),
             "lognormal_50_2048": (lognormal_lengths(4096, seed=0), args.batch, args.micro_batch,
                                   [2048, 4096, 8192])}
    for name, (lengths, batch, micro, budgets) in cases.items():
        rows = {f"fixed {micro} rows": padding(lengths, batch, micro, None, args.pad_multiple)}
        for budget in budgets:
            rows[f"budget {budget}"] = padding(lengths, batch, micro, budget, args.pad_multiple)
        for budget in budgets:
            rows[f"packed {budget}"] = padding(lengths, batch, micro, budget, args.pad_multiple, packed=True)
        tables[name] = {"batch": batch, "mean_length": statistics.mean(lengths),
                        "median_length": statistics.median(lengths), "rows": rows}
    return tables


def write_step_inputs(work: Path, rows: int, vocab: int) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.hf_models import randomize

    words = {f"w{i}": i for i in range(vocab - 1)} | {"<unk>": vocab - 1}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="w0",
                            pad_token="<unk>").save_pretrained(work / "tokenizer")
    paths = {"tokenizer": work / "tokenizer"}
    for name, (hidden, layers), seed in (("student", (64, 2), 1), ("teacher", (96, 2), 2)):
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=4096,
                             tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
        model = LlamaForCausalLM(config)
        randomize(model, seed)
        model.save_pretrained(work / name)
        paths[name] = work / name
    generator = random.Random(1)
    with open(work / "train.jsonl", "w") as handle:
        for length in lognormal_lengths(rows, seed=1):
            ids = [generator.randrange(1, vocab - 1) for _ in range(length - 1)]  # + EOS: `length` tokens
            split = len(ids) - max(1, length // 4)  # a quarter of the row is the response
            handle.write(json.dumps({"prompt": " ".join(f"w{i}" for i in ids[:split]),
                                     "completion": " ".join(f"w{i}" for i in ids[split:])}) + "\n")
    paths["data"] = work / "train.jsonl"
    return paths


def step_benchmark(args) -> dict:
    from megatron_opd.config import ParallelConfig
    from megatron_opd.config.job import load_job_config
    from megatron_opd.pipeline.batching import padding_fraction
    from megatron_opd.runtime import initialize_runtime
    from megatron_opd.trainer.trainer import Trainer

    os.environ.setdefault("MEGATRON_OPD_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="bench_microbatches_"))
    paths = write_step_inputs(work, 4 * args.batch * (args.rounds + 1), args.vocab)
    runtime = initialize_runtime(ParallelConfig())
    trainers, padded = {}, {}
    modes = {"fixed": ("null", False), "budget": (args.step_budget, False), "packed": (args.step_budget, True)}
    for mode, (budget, packed) in modes.items():
        overrides = {
            "model": paths["student"], "teacher_model": paths["teacher"], "lmbda": 0, "beta": 0.5,
            "data.dataset": f"[{paths['data']}]", "data.tokenizer": paths["tokenizer"], "data.prompt_format": "raw",
            "data.max_length": 2048, "data.shuffle": False, "training.train_iters": 10_000,
            "training.micro_batch_size": args.micro_batch, "training.global_batch_size": args.batch,
            "training.max_tokens_per_microbatch": budget, "training.pack_sequences": packed,
            "training.output_dir": work / mode,
            "training.resume": False, "training.export_hf": False, "training.tensorboard": False,
            "training.precision": "fp32", "optimizer.lr": 1e-5,
        }
        trainer = Trainer(load_job_config(None, [f"{key}={value}" for key, value in overrides.items()]), runtime)
        padded[mode] = []
        make = trainer.context.microbatches

        def recording(examples, make=make, into=padded[mode]):
            microbatches = make(examples)
            into.append(padding_fraction(examples, microbatches))
            return microbatches

        trainer.context.microbatches = recording
        trainers[mode] = trainer
    steps = {mode: [] for mode in modes}
    for round_ in range(args.rounds + 1):  # all see the same batches, in turn; round 0 is warm-up
        for mode in (list(modes) if round_ % 2 == 0 else list(reversed(modes))):
            metrics = trainers[mode].train_step()
            if round_:
                steps[mode].append(metrics)
    result = {"max_tokens_per_microbatch": args.step_budget, "micro_batch_size": args.micro_batch, "batch": args.batch}
    for mode, metrics in steps.items():
        result[mode] = {key: statistics.median(step[key] for step in metrics)
                        for key in ("tokens_per_s", "student_s", "teacher_s", "tokens")}
        result[mode]["padding_fraction"] = statistics.mean(padded[mode][1:])
    for mode in ("budget", "packed"):
        result[f"{mode}_tokens_per_s_ratio"] = result[mode]["tokens_per_s"] / result["fixed"]["tokens_per_s"]
        result[f"{mode}_student_s_ratio"] = result["fixed"]["student_s"] / result[mode]["student_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="rows per step (lognormal cases)")
    parser.add_argument("--micro-batch", type=int, default=4, help="fixed rows per microbatch (before)")
    parser.add_argument("--step-budget", type=int, default=4096, help="token budget of the step benchmark")
    parser.add_argument("--rounds", type=int, default=5, help="steps per mode, after one warm-up")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--quickstart-rows", type=int, default=4096)
    parser.add_argument("--no-step", action="store_true", help="padding tables only")
    parser.add_argument("--pad-multiple", type=int, default=8,
                        help="padding tables: lengths rounded up to this (8: CUDA; 1: CPU, where the trainer pads "
                             "only to TP under sequence parallelism)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"padding": padding_tables(args)}
    for name, table in results["padding"].items():
        print(f"{name}: {table['batch']} rows per step, mean length {table['mean_length']:.0f}, "
              f"median {table['median_length']:.0f}")
        for label, row in table["rows"].items():
            print(f"  {label:<16} padding {row['padding_fraction']:6.1%}   {row['microbatches_per_step']:5.1f} "
                  f"microbatches/step   {row['positions_per_step']:9.0f} positions/step")
    if not args.no_step:
        step = results["step"] = step_benchmark(args)
        for mode in ("fixed", "budget", "packed"):
            row = step[mode]
            print(f"step {mode:<6}: {row['tokens_per_s']:8.1f} tokens/s (median), student {row['student_s']:.3f}s, "
                  f"teacher {row['teacher_s']:.3f}s, padding {row['padding_fraction']:.1%}")
        for mode in ("budget", "packed"):
            print(f"{mode} {step['max_tokens_per_microbatch']} vs {step['micro_batch_size']} fixed rows: "
                  f"{step[f'{mode}_tokens_per_s_ratio']:.2f}x tokens/s, student forward-backward "
                  f"{step[f'{mode}_student_s_ratio']:.2f}x faster")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
