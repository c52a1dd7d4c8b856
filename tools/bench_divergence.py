"""Benchmark the vocab-parallel divergence kernel against eager and all-gather baselines.

Implementations, forward + backward, each case in a fresh process:
  a  eager: the dense formula on full logits, as TRL's `generalized_jsd_loss` computes it
  b  all-gather the TP shards (Megatron's differentiable gather), then (a)      [TP > 1]
  c  megatron_opd `vocab_parallel_divergence` on the shards
  d  megatron_opd `fused_linear_divergence` from hidden states and the LM head, H=1024;
     its baseline "d_eager" is an eager matmul + (a)

Per case: median wall time of --repeats runs after one warm-up; extra peak memory
(VmHWM after a reset through /proc/self/clear_refs, minus the resident size with the
inputs in place: tracemalloc does not see torch tensors); the loss error against a
float64 evaluation of the same formula; collective calls and bytes per token on the
TP group. A case that runs out of memory is reported as "OOM". Prints a table with
ratios and writes JSON.

    python tools/bench_divergence.py --shapes 1024x151936 --tp 1,2 --beta 0.5

Side by side (`--side-by-side`, TP=1, one process): the eager formula in the input dtype
(as TRL runs it: bf16 stays bf16), the kernel, and optionally an earlier version of
divergence.py (`--baseline FILE`), alternated round by round; medians and ratios. Cases
include a token mask (`--mask 0.5`: half the tokens count; eager computes every token and
drops the others, as TRL does with labels == -100) and small inputs (`--shapes 256x32000`
is TRL's [4, 64, 32000]). `--memory` instead measures one forward + backward per case in a
fresh process with glibc's default allocator settings: extra peak RSS and heap growth.

    python tools/bench_divergence.py --side-by-side --shapes 256x32000,4096x32768 --dtypes fp32,bf16
    python tools/bench_divergence.py --side-by-side --memory --shapes 1024x151936 --mask 0,0.5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

DEFAULT_SHAPES = "1024x151936,2048x151936,2048x128256,4096x32768"
HIDDEN = 1024


# --------------------------------------------------------------------- measurements


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


class _CollectiveCounter:
    """Counts calls and payload bytes of the collectives while active: torch.distributed's,
    and the all-gather / reduce-scatter functions Megatron bound at import time."""

    TORCH = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor")
    MEGATRON = ("dist_all_gather_func", "dist_reduce_scatter_func")

    def __init__(self):
        self.calls = 0
        self.bytes = 0
        self._originals = []

    def _wrap(self, owner, name: str, payload_index: int) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            payload = args[payload_index]
            self.calls += 1
            self.bytes += payload.numel() * payload.element_size()
            return original(*args, **kwargs)

        self._originals.append((owner, name, original))
        setattr(owner, name, counted)

    def __enter__(self):
        from megatron.core.tensor_parallel import mappings

        for name in self.TORCH:  # all_gather(outputs, input): count the input
            self._wrap(dist, name, 0 if name == "all_reduce" else 1)
        for name in self.MEGATRON:
            self._wrap(mappings, name, 1)
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)


_M_MMAP_THRESHOLD = -3


def _set_mmap_threshold(num_bytes: int) -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, num_bytes)


# ------------------------------------------------------------------ implementations


def eager_divergence(student_logits, teacher_logits, beta: float, temperature: float = 1.0):
    """The dense formula as TRL's `generalized_jsd_loss` computes it (mean over tokens)."""
    student_logp = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        per_entry = F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True)
    elif beta == 1:
        per_entry = F.kl_div(teacher_logp, student_logp, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_logp.dtype)
        mixture = torch.logsumexp(torch.stack([student_logp + torch.log(1 - beta_t),
                                               teacher_logp + torch.log(beta_t)]), dim=0)
        per_entry = (beta_t * F.kl_div(mixture, teacher_logp, reduction="none", log_target=True)
                     + (1 - beta_t) * F.kl_div(mixture, student_logp, reduction="none", log_target=True))
    return per_entry.sum() / student_logits.shape[0]


def eager_topk_divergence(student_logits, teacher_logits, beta: float, topk: int):
    """ms-swift's renormalized top-K: both distributions renormalized over the teacher's top K."""
    ids = teacher_logits.topk(topk, dim=-1).indices
    return eager_divergence(student_logits.gather(-1, ids), teacher_logits.gather(-1, ids), beta)


def reference_loss(student_full, teacher_full, beta: float, topk, rows: int = 64) -> float:
    """float64 value of the same loss, row chunk by row chunk (bounded memory)."""
    total = 0.0
    for start in range(0, student_full.shape[0], rows):
        s = student_full[start:start + rows].double()
        t = teacher_full[start:start + rows].double()
        chunk = eager_topk_divergence(s, t, beta, topk) if topk else eager_divergence(s, t, beta)
        total += chunk.item() * s.shape[0]
    return total / student_full.shape[0]


# ----------------------------------------------------------------------------- cases


def run_case(case: dict) -> dict:
    """One implementation on one shape, on this rank (inside run_distributed)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_opd.config import ParallelConfig
    from megatron_opd.ops import fused_linear_divergence, vocab_parallel_divergence
    from megatron_opd.runtime import initialize_runtime

    tp, tokens, vocab, beta, topk, impl = (case[k] for k in ("tp", "tokens", "vocab", "beta", "topk", "impl"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    initialize_runtime(ParallelConfig(tensor_model_parallel_size=tp))
    rank = parallel_state.get_tensor_model_parallel_rank()
    generator = torch.Generator().manual_seed(0)
    local = slice(rank * vocab // tp, (rank + 1) * vocab // tp)
    fused = impl in ("d", "d_eager")
    if fused:
        student_hidden = torch.randn(tokens, HIDDEN, generator=generator)
        teacher_hidden = torch.randn(tokens, HIDDEN, generator=generator)
        student_head = torch.randn(vocab, HIDDEN, generator=generator) * HIDDEN ** -0.5
        teacher_head = torch.randn(vocab, HIDDEN, generator=generator) * HIDDEN ** -0.5 * 2
        with torch.no_grad():
            error_ref = reference_loss(student_hidden @ student_head.T, teacher_hidden @ teacher_head.T,
                                       beta, topk)
        student_head, teacher_head = student_head[local].clone(), teacher_head[local].clone()
    else:
        student = torch.randn(tokens, vocab, generator=generator) * 2
        teacher = torch.randn(tokens, vocab, generator=generator) * 3
        error_ref = reference_loss(student, teacher, beta, topk)
        if impl in ("b", "c"):
            student, teacher = student[:, local].clone(), teacher[:, local].clone()

    # Leaves made once; each step drops the previous gradient (no input copies in the measurement).
    if fused:
        student_hidden.requires_grad_()
        student_head.requires_grad_()
        leaves = [student_hidden, student_head]
    else:
        student.requires_grad_()
        leaves = [student]

    def step() -> float:
        for leaf in leaves:
            leaf.grad = None
        if fused:
            if impl == "d":
                loss = fused_linear_divergence(student_hidden, student_head, teacher_hidden, teacher_head,
                                               beta=beta, topk=topk)
            else:
                student_logits = gather_from_tensor_model_parallel_region(student_hidden @ student_head.T)
                teacher_logits = gather_from_tensor_model_parallel_region(teacher_hidden @ teacher_head.T)
                loss = (eager_topk_divergence(student_logits, teacher_logits, beta, topk) if topk
                        else eager_divergence(student_logits, teacher_logits, beta))
        else:
            if impl == "c":
                loss = vocab_parallel_divergence(student, teacher, beta=beta, topk=topk)
            else:
                full_student = gather_from_tensor_model_parallel_region(student) if impl == "b" else student
                full_teacher = gather_from_tensor_model_parallel_region(teacher) if impl == "b" else teacher
                loss = (eager_topk_divergence(full_student, full_teacher, beta, topk) if topk
                        else eager_divergence(full_student, full_teacher, beta))
        loss.backward()
        return loss.item()

    # Peak memory first, in a fresh process: every allocation >= 64 KiB by mmap, so RSS
    # (and VmHWM) follows live tensors, not glibc's cache of freed blocks. The
    # gradient buffer the step allocates counts as extra.
    _set_mmap_threshold(64 * 1024)
    baseline_kib = _status_kib("VmRSS")
    _reset_peak()
    step()
    extra_peak_mib = (_status_kib("VmHWM") - baseline_kib) / 1024
    # Timing with heap reuse for chunk-sized temporaries, as glibc's default adapts to.
    _set_mmap_threshold(32 * 1024 * 1024)
    step()  # warm-up
    times = []
    with _CollectiveCounter() as collectives:
        for _ in range(case["repeats"]):
            start = time.perf_counter()
            value = step()
            times.append(time.perf_counter() - start)
    return {
        **case,
        "ms": 1000 * statistics.median(times),
        "extra_peak_mib": extra_peak_mib,
        "loss": value,
        "abs_error_vs_fp64": abs(value - error_ref),
        "collective_calls": collectives.calls / case["repeats"],
        "collective_bytes_per_token": collectives.bytes / case["repeats"] / tokens,
        "fp32_shard_mib": tokens * vocab // tp * 4 / 2**20,
    }


def measure(case: dict, timeout: float, run=run_case) -> dict:
    """`run(case)` on case["tp"] fresh gloo ranks; the worst rank's result, or the failure as "status"."""
    from megatron_opd.testing import DistributedTestError, run_distributed

    try:
        results = run_distributed(run, case["tp"], case, timeout=timeout)
    except DistributedTestError as error:
        text = str(error)
        status = "OOM" if ("exit code -9" in text or "out of memory" in text.lower()
                           or "MemoryError" in text) else "error: " + text.splitlines()[-1][:200]
        return {**case, "status": status}
    worst = max(results, key=lambda r: r["extra_peak_mib"])  # per rank: the worst rank
    return {**worst, "status": "ok"}


# ----------------------------------------------------------------------------- report


def _cell(result: dict, key: str, fmt: str) -> str:
    return format(result[key], fmt) if result.get("status") == "ok" else result.get("status", "-")[:12]


def print_table(results: list[dict]) -> None:
    header = f"{'impl':8} {'N':>5} {'V':>7} {'tp':>2} {'beta':>4} {'topk':>4} {'ms':>9} {'peak MiB':>9} " \
             f"{'x shard':>7} {'|err|':>9} {'calls':>5} {'B/token':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = f"{r['extra_peak_mib'] / r['fp32_shard_mib']:.2f}" if r.get("status") == "ok" else "-"
        print(f"{r['impl']:8} {r['tokens']:5d} {r['vocab']:7d} {r['tp']:2d} {r['beta']:4.1f} "
              f"{str(r['topk'] or '-'):>4} {_cell(r, 'ms', '9.1f'):>9} {_cell(r, 'extra_peak_mib', '9.1f'):>9} "
              f"{ratio:>7} {_cell(r, 'abs_error_vs_fp64', '9.2e'):>9} {_cell(r, 'collective_calls', '5.0f'):>5} "
              f"{_cell(r, 'collective_bytes_per_token', '9.1f'):>9}")
    print()
    by_key = {(r["impl"], r["tokens"], r["vocab"], r["tp"], r["beta"], r["topk"]): r for r in results}
    for (impl, tokens, vocab, tp, beta, topk), ours in by_key.items():
        if impl not in ("c", "d") or ours.get("status") != "ok":
            continue
        baselines = {"c": ("a", "b"), "d": ("d_eager",)}[impl]
        for base in baselines:
            other = by_key.get((base, tokens, vocab, tp if base != "a" else 1, beta, topk))
            if base == "a" and tp != 1 or other is None or other.get("status") != "ok":
                if other is not None and other.get("status") != "ok":
                    print(f"{impl} vs {base} N={tokens} V={vocab} tp={tp} beta={beta} topk={topk}: "
                          f"{base} {other['status']}")
                continue
            traffic = (f", traffic {other['collective_bytes_per_token'] / max(ours['collective_bytes_per_token'], 1e-9):.0f}x less"
                       if tp > 1 else "")
            print(f"{impl} vs {base} N={tokens} V={vocab} tp={tp} beta={beta} topk={topk}: "
                  f"{other['ms'] / ours['ms']:.2f}x faster, "
                  f"{other['extra_peak_mib'] / max(ours['extra_peak_mib'], 1e-3):.1f}x less extra peak memory"
                  f"{traffic}")


# ---------------------------------------------------------------- side by side, TP=1

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _load_baseline(path: str):
    """An earlier divergence.py (e.g. `git show HEAD:megatron_opd/ops/divergence.py > old.py`), imported
    under its own name beside the current package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_divergence", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _side_inputs(tokens: int, vocab: int, dtype: torch.dtype, mask_fraction: float):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(tokens, vocab, generator=generator) * 2).to(dtype).requires_grad_()
    teacher = (torch.randn(tokens, vocab, generator=generator) * 3).to(dtype)
    mask = None
    if mask_fraction:
        mask = torch.rand(tokens, generator=generator) < mask_fraction
    return student, teacher, mask


def _side_step(impl: str, student, teacher, mask, beta: float, baseline) -> float:
    student.grad = None
    if impl == "eager":  # TRL: every token, then the masked ones dropped
        if mask is None:
            loss = eager_divergence(student, teacher, beta)
        else:
            loss = _eager_per_token(student, teacher, beta)[mask].mean()
    else:
        from megatron_opd.ops import vocab_parallel_divergence

        function = baseline.vocab_parallel_divergence if impl == "baseline" else vocab_parallel_divergence
        loss = function(student, teacher, beta=beta, mask=mask)
    loss.backward()
    return loss.item()


def _eager_per_token(student_logits, teacher_logits, beta: float):
    """`eager_divergence` per token `[N]`."""
    student_logp = F.log_softmax(student_logits, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        return F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(teacher_logp, student_logp, reduction="none", log_target=True).sum(-1)
    beta_t = torch.tensor(beta, dtype=student_logp.dtype)
    mixture = torch.logsumexp(torch.stack([student_logp + torch.log(1 - beta_t),
                                           teacher_logp + torch.log(beta_t)]), dim=0)
    return (beta_t * F.kl_div(mixture, teacher_logp, reduction="none", log_target=True)
            + (1 - beta_t) * F.kl_div(mixture, student_logp, reduction="none", log_target=True)).sum(-1)


def side_by_side_times(case: dict, impls: list[str], rounds: int, baseline_path) -> dict:
    """Median wall and CPU ms per implementation, alternated round by round on the same inputs (CPU
    time is the steadier measure on a loaded machine)."""
    baseline = _load_baseline(baseline_path) if baseline_path else None
    student, teacher, mask = _side_inputs(case["tokens"], case["vocab"], DTYPES[case["dtype"]], case["mask"])
    times = {impl: [] for impl in impls}
    cpu_times = {impl: [] for impl in impls}
    for impl in impls:  # warm-up
        _side_step(impl, student, teacher, mask, case["beta"], baseline)
    for _ in range(rounds):
        for impl in impls:
            start, cpu_start = time.perf_counter(), time.process_time()
            _side_step(impl, student, teacher, mask, case["beta"], baseline)
            times[impl].append(time.perf_counter() - start)
            cpu_times[impl].append(time.process_time() - cpu_start)
    return ({impl: 1000 * statistics.median(values) for impl, values in times.items()},
            {impl: 1000 * statistics.median(values) for impl, values in cpu_times.items()})


def side_by_side_memory(case: dict, baseline_path) -> dict:
    """One forward + backward of case["impl"] in this (fresh) process, glibc defaults: extra peak
    RSS over the inputs, and how much the heap (brk) grew, in MiB."""
    import ctypes

    import megatron_opd.ops  # noqa: F401  (imported before the baseline RSS: code is not the step's memory)

    baseline = _load_baseline(baseline_path) if baseline_path else None
    student, teacher, mask = _side_inputs(case["tokens"], case["vocab"], DTYPES[case["dtype"]], case["mask"])
    libc = ctypes.CDLL("libc.so.6")
    libc.sbrk.restype = ctypes.c_void_p
    heap_start = libc.sbrk(0)
    baseline_kib = _status_kib("VmRSS")
    _reset_peak()
    _side_step(case["impl"], student, teacher, mask, case["beta"], baseline)
    return {"extra_peak_mib": (_status_kib("VmHWM") - baseline_kib) / 1024,
            "heap_growth_mib": (libc.sbrk(0) - heap_start) / 2**20,
            "fp32_shard_mib": case["tokens"] * case["vocab"] * 4 / 2**20}


def _in_fresh_process(function, *args):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def side_by_side(args) -> list[dict]:
    impls = ["eager", "kernel"] + (["baseline"] if args.baseline else [])
    results = []
    for shape in args.shapes.split(","):
        tokens, vocab = (int(x) for x in shape.lower().split("x"))
        for dtype in args.dtypes.split(","):
            for mask in (float(x) for x in args.mask.split(",")):
                for beta in (float(x) for x in args.beta.split(",")):
                    case = dict(tokens=tokens, vocab=vocab, dtype=dtype, mask=mask, beta=beta)
                    if args.memory:
                        for impl in impls:
                            result = {**case, "impl": impl,
                                      **_in_fresh_process(side_by_side_memory, {**case, "impl": impl}, args.baseline)}
                            print(f"N={tokens} V={vocab} {dtype} mask={mask} beta={beta} {impl:8}: extra peak "
                                  f"{result['extra_peak_mib']:8.1f} MiB "
                                  f"({result['extra_peak_mib'] / result['fp32_shard_mib']:.2f}x fp32 [N, V]), heap "
                                  f"+{result['heap_growth_mib']:.1f} MiB", flush=True)
                            results.append(result)
                        continue
                    ms, cpu_ms = side_by_side_times(case, impls, args.repeats, args.baseline)
                    line = " ".join(f"{impl} {ms[impl]:7.1f} ms ({cpu_ms[impl]:7.1f} CPU)" for impl in impls)
                    ratios = ", ".join(f"{impl}/kernel {ms[impl] / ms['kernel']:.2f}x "
                                       f"({cpu_ms[impl] / cpu_ms['kernel']:.2f}x CPU)" for impl in impls
                                       if impl != "kernel")
                    print(f"N={tokens} V={vocab} {dtype} mask={mask} beta={beta} threads={torch.get_num_threads()}: "
                          f"{line}  ({ratios})", flush=True)
                    results.append({**case, "threads": torch.get_num_threads(), "ms": ms, "cpu_ms": cpu_ms})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated NxV")
    parser.add_argument("--tp", default="1,2")
    parser.add_argument("--beta", default="0,0.5,1")
    parser.add_argument("--topk", default="none,64", help="comma-separated K values; 'none' is full vocab")
    parser.add_argument("--impls", default="a,b,c,d,d_eager")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--out", default="bench_divergence.json")
    parser.add_argument("--side-by-side", action="store_true", help="TP=1, implementations alternated in one run")
    parser.add_argument("--dtypes", default="fp32", help="side by side: comma-separated, of fp32,bf16")
    parser.add_argument("--mask", default="0", help="side by side: fractions of tokens that count (0: no mask)")
    parser.add_argument("--baseline", help="side by side: an earlier divergence.py to compare against")
    parser.add_argument("--memory", action="store_true", help="side by side: peak RSS and heap growth per case")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be >= 3 (the median of at least three timed runs)")
    if args.side_by_side:
        results = side_by_side(args)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
        return
    cases = []
    for shape in args.shapes.split(","):
        tokens, vocab = (int(x) for x in shape.lower().split("x"))
        for tp in (int(x) for x in args.tp.split(",")):
            for beta in (float(x) for x in args.beta.split(",")):
                for topk in (None if x == "none" else int(x) for x in args.topk.split(",")):
                    for impl in args.impls.split(","):
                        if (impl == "a" and tp != 1) or (impl == "b" and tp == 1):
                            continue
                        cases.append(dict(impl=impl, tokens=tokens, vocab=vocab, tp=tp, beta=beta,
                                          topk=topk, repeats=args.repeats))
    results = []
    for index, case in enumerate(cases, 1):
        print(f"[{index}/{len(cases)}] {case}", flush=True)
        results.append(measure(case, args.timeout))
    print_table(results)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
