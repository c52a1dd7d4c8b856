"""Benchmark the vocab-parallel token log-probs, top-k and sampler against eager baselines.

Jobs and implementations, each case in a fresh process, one intra-op thread:
  logprobs  eager        full logits: log_softmax(logits / T).gather(ids), forward + backward
            ours         `vocab_parallel_token_logprobs` on the TP shard, forward + backward
            fused_eager  an eager matmul `hidden @ W.T` (H=1024), then eager
            fused        `fused_linear_token_logprobs` from the hidden states and the LM-head shard
  topk      eager        `hidden @ W.T`, log_softmax, torch.topk, the given tokens gathered (no grad)
            ours         `fused_linear_topk_logprobs` (what the teacher server runs)
  sample    loop         the sampler before vectorization: one torch.Generator per row, a
                         full-vocab torch.rand per row in a Python loop, Gumbel-max over the shard
            multinomial  torch.multinomial(softmax(logits / T)) on the full logits
            ours         `vocab_parallel_sample` with per-row seeds and a step counter

Eager and multinomial baselines hold the full vocab and run at TP=1 only. Per case, as in
`bench_divergence.py` (whose measurement helpers this reuses): median wall time of
--repeats runs after one warm-up (and the median CPU time of this process, steadier on a
shared machine); extra peak memory (VmHWM after a reset, minus the
resident size with the inputs in place); for log-probs and top-k the error against a
float64 evaluation; collective calls and bytes per row on the TP group. Prints a table
with the ratios to each baseline and writes JSON.

    python tools/bench_ops.py --shapes 64x32768 --jobs sample
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from bench_divergence import _CollectiveCounter, _reset_peak, _set_mmap_threshold, _status_kib, measure

DEFAULT_SHAPES = "64x32768,512x32768"
HIDDEN = 1024
TEMPERATURE = 0.8
TOPK = 20
IMPLS = {"logprobs": ("eager", "ours", "fused_eager", "fused"), "topk": ("eager", "ours"),
         "sample": ("loop", "multinomial", "ours")}
BASELINES = {("logprobs", "ours"): ("eager",), ("logprobs", "fused"): ("fused_eager",),
             ("topk", "ours"): ("eager",), ("sample", "ours"): ("loop", "multinomial")}
TP1_ONLY = {"eager", "fused_eager", "multinomial"}


# ------------------------------------------------------------------------- baselines


def loop_sample(logits: torch.Tensor, shard, temperature: float, row_generators: list) -> torch.Tensor:
    """`vocab_parallel_sample` as it was before vectorization (the row_generators path):
    per row, full-vocab uniforms from the row's own generator, sliced to this shard."""
    from megatron_opd.ops.vocab_parallel import tempered

    scores = tempered(logits, shard, temperature)
    uniform = torch.stack([torch.rand(shard.vocab_size, generator=row, device=row.device)
                           for row in row_generators])
    uniform = uniform[:, shard.start:shard.start + shard.valid_local].to(logits.device)
    noise = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))
    scores = scores + F.pad(noise, (0, shard.local_vocab - shard.valid_local))
    local_best, local_index = scores.max(dim=-1)
    best = shard.all_reduce(local_best.clone(), dist.ReduceOp.MAX)
    candidate = torch.where(local_best == best, local_index + shard.start,
                            torch.full_like(local_index, shard.padded_vocab))
    return shard.all_reduce(candidate, dist.ReduceOp.MIN)


# ----------------------------------------------------------------------------- cases


def _inputs(case: dict, rank: int) -> dict:
    """The full inputs (seed 0) and this rank's vocab slice of them."""
    tp, rows, vocab = case["tp"], case["rows"], case["vocab"]
    generator = torch.Generator().manual_seed(0)
    local = slice(rank * vocab // tp, (rank + 1) * vocab // tp)
    ids = torch.randint(0, vocab, (rows,), generator=generator)
    if case["job"] == "topk" or case["impl"] in ("fused", "fused_eager"):
        hidden = torch.randn(rows, HIDDEN, generator=generator)
        head = torch.randn(vocab, HIDDEN, generator=generator) * HIDDEN ** -0.5 * 3
        return {"hidden": hidden, "head": head, "head_shard": head[local].clone(), "ids": ids}
    logits = torch.randn(rows, vocab, generator=generator) * 2
    return {"logits": logits, "logits_shard": logits[:, local].clone(), "ids": ids}


def _reference(case: dict, data: dict) -> torch.Tensor:
    """float64 log_softmax of the full logits `[rows, V]`."""
    logits = data["logits"] if "logits" in data else data["hidden"].double() @ data["head"].double().T
    return torch.log_softmax(logits.double() / TEMPERATURE, -1)


def _job(case: dict, data: dict, shard):
    """(step, error): `step()` runs the implementation once; `error(output)` its error vs float64."""
    from megatron_opd.ops import (
        fused_linear_token_logprobs,
        fused_linear_topk_logprobs,
        vocab_parallel_sample,
        vocab_parallel_token_logprobs,
    )

    job, impl, ids = case["job"], case["impl"], data["ids"]
    if job == "logprobs":
        fused = impl in ("fused", "fused_eager")
        leaves = [data["hidden"], data["head_shard"] if impl == "fused" else data["head"]] if fused else \
            [data["logits_shard"] if impl == "ours" else data["logits"]]
        for leaf in leaves:
            leaf.requires_grad_()

        def step():
            for leaf in leaves:
                leaf.grad = None
            if impl == "ours":
                value = vocab_parallel_token_logprobs(leaves[0], ids, temperature=TEMPERATURE)
            elif impl == "fused":
                value = fused_linear_token_logprobs(leaves[0], leaves[1], ids, temperature=TEMPERATURE)
            else:
                logits = leaves[0] @ leaves[1].T if fused else leaves[0]
                value = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, ids[:, None]).squeeze(-1)
            total = value.sum()
            total.backward()
            return total.detach()

        def error(output):
            return abs(output.item() - _reference(case, data).gather(-1, ids[:, None]).sum().item())
        return step, error
    if job == "topk":
        def step():
            with torch.no_grad():
                if impl == "ours":
                    return fused_linear_topk_logprobs(data["hidden"], data["head_shard"], TOPK, token_ids=ids,
                                                      temperature=TEMPERATURE)[0]
                logp = torch.log_softmax(data["hidden"] @ data["head"].T / TEMPERATURE, -1)
                values, top_ids = logp.topk(TOPK, dim=-1)
                return values, top_ids, logp.gather(-1, ids[:, None])

        def error(output):
            values = output if torch.is_tensor(output) else output[0]
            return (values.double() - _reference(case, data).topk(TOPK, dim=-1).values).abs().max().item()
        return step, error
    # sample: one decode step per call, every row from its own stream
    rows = case["rows"]
    counter = iter(range(10**9))
    if impl == "loop":
        streams = [torch.Generator().manual_seed(row) for row in range(rows)]
        return (lambda: loop_sample(data["logits_shard"], shard, TEMPERATURE, streams)), None
    if impl == "multinomial":
        generator = torch.Generator().manual_seed(0)
        return (lambda: torch.multinomial(torch.softmax(data["logits"] / TEMPERATURE, -1), 1,
                                          generator=generator).squeeze(-1)), None
    seeds = torch.arange(rows)
    return (lambda: vocab_parallel_sample(data["logits_shard"], temperature=TEMPERATURE, seeds=seeds,
                                          step=next(counter))), None


def run_case(case: dict) -> dict:
    """One implementation of one job on one shape, on this rank (inside run_distributed)."""
    from megatron.core import parallel_state

    from megatron_opd.config import ParallelConfig
    from megatron_opd.ops.vocab_parallel import vocab_shard
    from megatron_opd.runtime import initialize_runtime

    initialize_runtime(ParallelConfig(tensor_model_parallel_size=case["tp"]))
    torch.set_num_threads(1)  # after the runtime, which sets its own
    rank = parallel_state.get_tensor_model_parallel_rank()
    data = _inputs(case, rank)
    shard = vocab_shard(case["vocab"] // case["tp"], None, None)
    step, error = _job(case, data, shard)

    # Peak memory first, every allocation >= 64 KiB by mmap so that VmHWM follows live
    # tensors (see bench_divergence.py); then timing with glibc's heap reuse.
    _set_mmap_threshold(64 * 1024)
    baseline_kib = _status_kib("VmRSS")
    _reset_peak()
    step()
    extra_peak_mib = (_status_kib("VmHWM") - baseline_kib) / 1024
    _set_mmap_threshold(32 * 1024 * 1024)
    step()  # warm-up
    times, cpu_times = [], []
    with _CollectiveCounter() as collectives:
        for _ in range(case["repeats"]):
            start, cpu_start = time.perf_counter(), time.process_time()
            output = step()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {
        **case,
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu_times),
        "extra_peak_mib": extra_peak_mib,
        "abs_error_vs_fp64": error(output) if error else None,
        "collective_calls": collectives.calls / case["repeats"],
        "collective_bytes_per_row": collectives.bytes / case["repeats"] / case["rows"],
    }


# ----------------------------------------------------------------------------- report


def _cell(result: dict, key: str, fmt: str) -> str:
    if result.get("status") != "ok":
        return result.get("status", "-")[:12]
    return "-" if result[key] is None else format(result[key], fmt)


def print_table(results: list[dict]) -> None:
    header = (f"{'job':8} {'impl':11} {'rows':>5} {'V':>7} {'tp':>2} {'median s':>10} {'cpu s':>10} {'peak MiB':>9} "
              f"{'|err|':>9} {'calls':>5} {'B/row':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['job']:8} {r['impl']:11} {r['rows']:5d} {r['vocab']:7d} {r['tp']:2d} "
              f"{_cell(r, 'seconds', '10.5f'):>10} {_cell(r, 'cpu_seconds', '10.5f'):>10} "
              f"{_cell(r, 'extra_peak_mib', '9.1f'):>9} "
              f"{_cell(r, 'abs_error_vs_fp64', '9.2e'):>9} {_cell(r, 'collective_calls', '5.0f'):>5} "
              f"{_cell(r, 'collective_bytes_per_row', '8.1f'):>8}")
    print()
    by_key = {(r["job"], r["impl"], r["rows"], r["vocab"], r["tp"]): r for r in results}
    for (job, impl, rows, vocab, tp), ours in by_key.items():
        if (job, impl) not in BASELINES or ours.get("status") != "ok":
            continue
        for base in BASELINES[job, impl]:
            other = by_key.get((job, base, rows, vocab, 1 if base in TP1_ONLY else tp))
            if other is None:
                continue
            where = f"{job} {impl} vs {base} rows={rows} V={vocab} tp={tp}"
            if other.get("status") != "ok":
                print(f"{where}: {base} {other.get('status')}")
                continue
            print(f"{where}: {other['seconds']:.5f} s / {ours['seconds']:.5f} s = "
                  f"{other['seconds'] / ours['seconds']:.2f}x faster (CPU time "
                  f"{other['cpu_seconds'] / ours['cpu_seconds']:.2f}x), "
                  f"{other['extra_peak_mib'] / max(ours['extra_peak_mib'], 1e-3):.1f}x less extra peak memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated ROWSxV (rows: tokens)")
    parser.add_argument("--jobs", default="logprobs,topk,sample")
    parser.add_argument("--impls", default=None, help="comma-separated; default: every one of each job")
    parser.add_argument("--tp", default="1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--out", default="bench_ops.json")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be >= 3 (the median of at least three timed runs)")
    cases = []
    for shape in args.shapes.split(","):
        rows, vocab = (int(x) for x in shape.lower().split("x"))
        for tp in (int(x) for x in args.tp.split(",")):
            for job in args.jobs.split(","):
                for impl in IMPLS[job]:
                    if (args.impls and impl not in args.impls.split(",")) or (impl in TP1_ONLY and tp != 1):
                        continue
                    cases.append(dict(job=job, impl=impl, rows=rows, vocab=vocab, tp=tp, repeats=args.repeats))
    results = []
    for index, case in enumerate(cases, 1):
        print(f"[{index}/{len(cases)}] {case}", flush=True)
        results.append(measure(case, args.timeout, run_case))
    print_table(results)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
