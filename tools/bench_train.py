"""Benchmark a GKD training step and the student sampler, on CPU (or GPU), at any TP/PP layout.

    python tools/bench_train.py                                   # one process
    torchrun --standalone --nproc-per-node 2 tools/bench_train.py --tp 2
    python tools/bench_train.py --json bench_train.json

Random Llama models (weights drawn at O(1) logit scale), a word-level tokenizer of
--vocab tokens and random prompt/completion rows are written to --workdir; then the
real `Trainer` runs GKD steps in two modes:
  on-policy   lmbda=1: every step samples the student's responses (--completion-len
              tokens, no EOS, so every step generates the same amount)
  off-policy  lmbda=0: dataset responses
and reports per step the mean seconds of each phase (sampling, teacher forward,
student forward-backward, optimizer step), response tokens per second over the whole
step, and the peak memory (CPU: the process's peak RSS, `ru_maxrss`, which only grows,
so the second mode's figure covers both; GPU: `torch.cuda.max_memory_allocated`).
Then the sampler alone: --batch prompts of --prompt-len tokens, --completion-len new
tokens each, with and without the KV cache (tokens generated per second); and with rows that
stop at EOS at different lengths (any of --sampler-eos-fraction of the vocabulary ends a row:
geometric lengths, mean about 1 / fraction), finished rows compacted out of the batch and its KV
cache (the default) against kept to the end, alternated over --sampler-repeats (medians; both
must give the same ids).
The first --warmup steps of each mode are not counted.

    # a mixture-of-experts student (Qwen3-MoE: 8 experts, top-2, experts of 256, layer 0 dense),
    # its experts split over 2 ranks
    torchrun --standalone --nproc-per-node 2 tools/bench_train.py --student-experts 8,2,256 --ep 2

    # a real-model pair: a Qwen2.5-0.5B-shaped student from a Qwen2.5-1.5B-shaped teacher
    torchrun --standalone --nproc-per-node 2 tools/bench_train.py --preset qwen2.5-0.5b-from-1.5b \
        --tp 2 --precision bf16

`--preset` sets both shapes (Qwen2 family: QKV bias, tied embeddings), the model vocab
(151,936) and a tokenizer of Qwen2.5's 151,665 tokens (ids above it are padding, masked in
both models), sequences of 512 (256 prompt + 256 response tokens). Also reported: the
peak RSS of every rank, and the teacher signal's bytes per response token: the teacher's
final hidden states that the trainer keeps (`[N, H_T]` in the model dtype) against the
full fp32 logits `[N, V]` a logits-passing design would hold.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_against_trl  # noqa: E402  (tools/, next to this file)

PHASES = ("sampling_s", "teacher_s", "student_s", "optimizer_s")
PRESETS = {
    # Qwen2.5-0.5B (24 layers, hidden 896, 14/2 heads, FFN 4864) from Qwen2.5-1.5B (28 layers,
    # hidden 1536, 12/2 heads, FFN 8960); both vocab 151,936 over a 151,665-token tokenizer
    "qwen2.5-0.5b-from-1.5b": {"student": "896,24,14,2,4864", "teacher": "1536,28,12,2,8960",
                               "vocab": 151936, "tokenizer_vocab": 151665, "family": "qwen2",
                               "prompt_len": 256, "completion_len": 256},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/megatron_opd_bench_train"))
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--student", default="256,4,4,2,768", help="hidden,layers,heads,kv_heads,ffn")
    parser.add_argument("--teacher", default="512,6,8,2,1536", help="hidden,layers,heads,kv_heads,ffn")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--completion-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="global batch size (sequences per step)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per mode (per run with --against)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--student-experts", metavar="EXPERTS,TOPK,FFN",
                        help="the student is a Qwen3-MoE of these experts (layer 0 dense, the others MoE)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (with --student-experts)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="training.precision (auto: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--family", choices=["llama", "qwen2"], default="llama",
                        help="llama: untied, no QKV bias; qwen2: QKV bias, tied embeddings")
    parser.add_argument("--tokenizer-vocab", type=int, help="tokens in the tokenizer (default: --vocab)")
    parser.add_argument("--modes", default="on_policy,off_policy", help="which of on_policy, off_policy to run")
    parser.add_argument("--no-sampler", action="store_true", help="skip the sampler-alone measurement")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="real-model shapes (overrides the sizes)")
    parser.add_argument("--sampler-eos-fraction", type=float, default=1 / 64,
                        help="share of the vocabulary that ends a row in the EOS-stop sampler measurement")
    parser.add_argument("--sampler-repeats", type=int, default=3, help="alternated repeats of the EOS-stop measurement")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--against", choices=["trl"],
                        help="trl: the same GKD steps against TRL's own GKDTrainer, side by side in alternated "
                             "one-thread subprocesses (tools/bench_against_trl.py; the quickstart's shapes "
                             "unless --preset or sizes are given)")
    bench_against_trl.add_arguments(parser)
    args = parser.parse_args()
    if args.against and not args.preset:  # the quickstart's shapes, unless given on the command line
        given = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in sys.argv[1:] if arg.startswith("--")}
        for key, value in bench_against_trl.QUICKSTART_SHAPES.items():
            if key not in given:
                setattr(args, key, value)
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    args.tokenizer_vocab = args.tokenizer_vocab or args.vocab
    if args.tokenizer_vocab > args.vocab:
        parser.error(f"--tokenizer-vocab {args.tokenizer_vocab} exceeds --vocab {args.vocab}")
    return args


def write_inputs(args: argparse.Namespace) -> dict:
    """Tokenizer, student, teacher and data under --workdir (rewritten every run)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3MoeConfig

    from tests.hf_models import randomize

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    vocab = {f"w{i}": i for i in range(args.tokenizer_vocab - 1)} | {"<unk>": args.tokenizer_vocab - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="w0",
                            pad_token="<unk>").save_pretrained(work / "tokenizer")
    paths = {"tokenizer": work / "tokenizer"}
    for name, size, seed in (("student", args.student, 1), ("teacher", args.teacher, 2)):
        hidden, layers, heads, kv_heads, ffn = (int(value) for value in size.split(","))
        config_class = Qwen2Config if args.family == "qwen2" else LlamaConfig
        config = config_class(vocab_size=args.vocab, hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=ffn,
                              max_position_embeddings=4096, rms_norm_eps=1e-6,
                              tie_word_embeddings=args.family == "qwen2",
                              architectures=[config_class.__name__.replace("Config", "ForCausalLM")])
        if name == "student" and args.student_experts:
            experts, topk, expert_ffn = (int(value) for value in args.student_experts.split(","))
            config = Qwen3MoeConfig(
                vocab_size=args.vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=hidden // heads, intermediate_size=ffn,
                moe_intermediate_size=expert_ffn, num_experts=experts, num_experts_per_tok=topk,
                norm_topk_prob=True, mlp_only_layers=[0], router_aux_loss_coef=0.001, max_position_embeddings=4096,
                rms_norm_eps=1e-6, tie_word_embeddings=False, architectures=["Qwen3MoeForCausalLM"])
        model = AutoModelForCausalLM.from_config(config)
        randomize(model, seed)
        # Real checkpoints are stored in bf16 (half the disk of fp32 for the preset's 2 + 6 GB);
        # the run loads them in its own precision.
        model.to(torch.bfloat16 if args.preset else torch.float32).save_pretrained(work / name)
        paths[name] = work / name
    generator = torch.Generator().manual_seed(0)
    with open(work / "train.jsonl", "w") as handle:
        for _ in range(4 * args.batch):
            # Ids from 1: id 0 is the EOS, which would end a sampled response early.
            prompt, completion = (torch.randint(1, args.tokenizer_vocab - 1, (length,), generator=generator).tolist()
                                  for length in (args.prompt_len, args.completion_len - 1))
            handle.write(json.dumps({"prompt": " ".join(f"w{i}" for i in prompt),
                                     "completion": " ".join(f"w{i}" for i in completion)}) + "\n")
    paths["data"] = work / "train.jsonl"
    return paths


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_mode(args, paths: dict, runtime, lmbda: float) -> tuple[dict, object]:
    from megatron_opd.config.job import load_job_config
    from megatron_opd.trainer.trainer import Trainer

    overrides = {
        "model": paths["student"], "teacher_model": paths["teacher"], "lmbda": lmbda, "beta": 0.5,
        "temperature": 1.0, "max_completion_length": args.completion_len, "data.dataset": f"[{paths['data']}]",
        "data.tokenizer": paths["tokenizer"], "data.prompt_format": "raw",
        "data.max_length": args.prompt_len + args.completion_len + 1, "data.shuffle": False,
        "parallel.tensor_model_parallel_size": args.tp, "parallel.pipeline_model_parallel_size": args.pp,
        "parallel.expert_model_parallel_size": args.ep,
        "training.train_iters": args.warmup + args.steps, "training.micro_batch_size": args.micro_batch,
        "training.global_batch_size": args.batch, "training.output_dir": args.workdir / f"run_lmbda{lmbda}",
        "training.resume": False, "training.export_hf": False, "training.tensorboard": False,
        "training.precision": args.precision, "optimizer.lr": 1e-5,
    }
    config = load_job_config(None, [f"{key}={value}" for key, value in overrides.items()])
    trainer = Trainer(config, runtime)
    steps = [trainer.train_step() for _ in range(args.warmup + args.steps)][args.warmup:]
    peaks: list = [None] * runtime.world_size
    torch.distributed.all_gather_object(peaks, peak_memory_bytes(runtime.device) / 2**30)
    result = {"peak_memory_gib": max(peaks), "peak_memory_gib_per_rank": peaks,
              "teacher_signal_bytes_per_token": teacher_signal_bytes(trainer)}
    if steps[0]:  # the logging ranks (last pipeline stage)
        for key in PHASES + ("tokens", "tokens_per_s"):
            result[key] = statistics.mean(step.get(key, 0.0) for step in steps)
        total = sum(result[key] for key in PHASES)
        result["step_s"] = total
        result["share"] = {key: result[key] / total for key in PHASES}
    return result, trainer


def teacher_signal_bytes(trainer) -> dict:
    """Bytes per response token of what the trainer keeps of the teacher (its final hidden
    states, model dtype) against the fp32 logits over the padded vocab."""
    from megatron_opd.models.tp_layout import unwrap

    teacher = unwrap(trainer.teacher.model)
    hidden = teacher.config.hidden_size * torch.tensor([], dtype=trainer.dtype).element_size()
    logits = teacher.vocab_size * 4
    return {"hidden_states": hidden, "fp32_logits": logits, "ratio": logits / hidden}


def bench_sampler(args, trainer) -> dict:
    from megatron_opd.rollout import MegatronSampler, SamplingParams

    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, args.tokenizer_vocab - 1, (args.batch, args.prompt_len), generator=generator).tolist()
    params = SamplingParams(max_new_tokens=args.completion_len, temperature=1.0)  # no EOS: full length
    result = {}
    for cache in (True, False):
        sampler = MegatronSampler(trainer.model, trainer.vocab_size, use_kv_cache=cache)
        sampler.generate(prompts[:2], SamplingParams(max_new_tokens=2, temperature=1.0), [0, 1])  # warm-up
        started = time.monotonic()
        rollout = sampler.generate(prompts, params, list(range(len(prompts))))
        seconds = time.monotonic() - started
        result["kv_cache" if cache else "no_cache"] = {"tokens": rollout.num_tokens, "seconds": seconds,
                                                       "tokens_per_s": rollout.num_tokens / seconds}
    result["speedup"] = result["kv_cache"]["tokens_per_s"] / result["no_cache"]["tokens_per_s"]
    result["eos_stops"] = bench_compaction(args, trainer, prompts)
    return result


def bench_compaction(args, trainer, prompts: list) -> dict:
    """Rows stopping at EOS at different lengths: finished rows compacted out of the batch against kept."""
    from megatron_opd.rollout import MegatronSampler, SamplingParams

    eos = tuple(range(1, 1 + max(1, round(args.sampler_eos_fraction * (args.tokenizer_vocab - 2)))))
    params = SamplingParams(max_new_tokens=args.completion_len, temperature=1.0, eos_token_ids=eos)
    seeds = list(range(len(prompts)))
    runs: dict = {True: [], False: []}
    for repeat in range(args.sampler_repeats):
        for compact in ((True, False) if repeat % 2 == 0 else (False, True)):
            sampler = MegatronSampler(trainer.model, trainer.vocab_size, compact_finished=compact)
            started = time.monotonic()
            rollout = sampler.generate(prompts, params, seeds)
            runs[compact].append((rollout.num_tokens / (time.monotonic() - started), rollout.completions))
    if any(completions != runs[True][0][1] for _, completions in runs[True] + runs[False]):
        raise SystemExit("compacted and uncompacted sampling gave different ids")
    lengths = sorted(len(completion) for completion in runs[True][0][1])
    compacted = statistics.median(speed for speed, _ in runs[True])
    kept = statistics.median(speed for speed, _ in runs[False])
    return {"eos_ids": len(eos), "lengths_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
            "compacted_tokens_per_s": compacted, "kept_tokens_per_s": kept, "speedup": compacted / kept}


def main() -> None:
    args = parse_args()
    if args.against == "trl":
        results = bench_against_trl.run_comparison(args, write_inputs)
        bench_against_trl.print_report(results["summary"])
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return
    os.environ.setdefault("MEGATRON_OPD_DEVICE", "cpu" if not torch.cuda.is_available() else "cuda")
    from megatron_opd.config import ParallelConfig
    from megatron_opd.runtime import initialize_runtime

    runtime = initialize_runtime(ParallelConfig(tensor_model_parallel_size=args.tp,
                                                pipeline_model_parallel_size=args.pp,
                                                expert_model_parallel_size=args.ep))
    if runtime.rank == 0:
        paths = write_inputs(args)
    torch.distributed.barrier()
    paths = {name: args.workdir / name for name in ("tokenizer", "student", "teacher")}
    paths["data"] = args.workdir / "train.jsonl"
    results = {"device": str(runtime.device), "world_size": runtime.world_size, "tp": args.tp, "pp": args.pp,
               "ep": args.ep, "student_experts": args.student_experts,
               "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()}}
    trainer = None
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - {"on_policy", "off_policy"})
    if unknown or not modes:
        raise SystemExit(f"--modes {args.modes!r} is invalid: a comma-separated list of on_policy, off_policy")
    results["precision"] = args.precision
    for name in modes:
        trainer = None  # the previous mode's models go before the next mode's load (real shapes: GBs)
        gc.collect()
        results[name], trainer = bench_mode(args, paths, runtime, 1.0 if name == "on_policy" else 0.0)
        if runtime.rank == 0:
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    if not args.no_sampler:
        results["sampler"] = bench_sampler(args, trainer)
    if runtime.rank == 0:
        print_report(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")


def print_report(results: dict) -> None:
    print(f"\ndevice {results['device']}, world {results['world_size']} (tp {results['tp']}, pp {results['pp']}), "
          f"{results['threads']} threads per rank, precision {results['precision']}")
    print(f"{'mode':<12}{'step s':>8}{'tok/s':>9}{'sample':>8}{'teacher':>9}{'student':>9}{'optim':>7}"
          f"{'peak GiB':>10}")
    for name in ("on_policy", "off_policy"):
        row = results.get(name, {})
        if "share" not in row:
            continue
        shares = "".join(f"{100 * row['share'][key]:>{width}.0f}%" for key, width in
                         zip(PHASES, (7, 8, 8, 6)))
        print(f"{name:<12}{row['step_s']:>8.3f}{row['tokens_per_s']:>9.0f}{shares}{row['peak_memory_gib']:>10.2f}")
    for name in ("on_policy", "off_policy"):
        if name in results:
            signal = results[name]["teacher_signal_bytes_per_token"]
            peaks = ", ".join(f"{value:.2f}" for value in results[name]["peak_memory_gib_per_rank"])
            print(f"{name}: peak RSS per rank {peaks} GiB; teacher signal {signal['hidden_states']} B/token "
                  f"(hidden states) vs {signal['fp32_logits']} B/token (fp32 logits), {signal['ratio']:.0f}x less")
    if "sampler" not in results:
        return
    sampler = results["sampler"]
    print(f"sampler: {sampler['kv_cache']['tokens_per_s']:.0f} tok/s with the KV cache, "
          f"{sampler['no_cache']['tokens_per_s']:.0f} without ({sampler['speedup']:.1f}x)")
    stops = sampler["eos_stops"]
    print(f"sampler, rows stopping at EOS (lengths min/median/max {stops['lengths_min_median_max']}): "
          f"{stops['compacted_tokens_per_s']:.0f} tok/s with finished rows compacted out, "
          f"{stops['kept_tokens_per_s']:.0f} with them kept ({stops['speedup']:.2f}x)")


if __name__ == "__main__":
    main()
