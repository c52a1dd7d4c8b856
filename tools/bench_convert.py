"""Benchmark `megatron-opd convert` on a random model with Qwen2.5-0.5B dimensions, on CPU.

Steps, each the real CLI in its own subprocess with MEGATRON_OPD_DEVICE=cpu:
  baseline        python importing torch, megatron.core and the converter, nothing else
  hf-to-megatron  the random HF model -> Megatron dist-checkpoint, tp=1
  megatron-to-hf  back to a new HF directory, tp=1
  megatron-to-hf  the same under `torchrun --standalone --nproc-per-node 2 ... --tp 2`  [--tp2]
  verify          `megatron-opd convert verify`, fp32 logits of both, --seq-length 32 --batch-size 1  [--verify]
  megatron-to-hf  under `torchrun --standalone --nproc-per-node 2 ... --ep 2`  [--moe]
`--moe`: the model is a Qwen3-MoE with Qwen3-30B-A3B's ratios at 0.5B scale (64 experts,
top-8, experts of 256, one dense layer) instead of Qwen2.5-0.5B, and the EP=2 step runs.
The random model (transformers' `from_config` in --dtype, weights redrawn by
`tests.hf_models.randomize` so logits are O(1)) is made in this process first.
Every HF directory written back is compared with the input tensor by tensor,
bit for bit (`safe_open`, one tensor at a time). Exits non-zero if a step fails
(verify included) or a round trip differs.

Memory, per step:
  peak RSS  exact: the kernel's high-water mark of resident memory (VmHWM) of the
            largest process of the command's tree: the `ru_maxrss` that `wait4`
            returns, i.e. the max over the command and every descendant it waited for
            (torchrun's ranks, dist-checkpointing's writer processes): per rank under
            torchrun. The command runs under a small launcher process that calls
            `wait4`, since Linux starts an exec'd child's maxrss at the high-water mark
            of the image it replaced (a child of this process would inherit its peak).
            Counts file-backed pages too (memory-mapped safetensors being read).
  anon      sampled every 50 ms: the largest anonymous RSS (/proc/<pid>/smaps_rollup
            "Anonymous") of one process of the tree: memory that is not page cache.
  tree      sampled every 50 ms: the largest sum of PSS over the tree (shared pages
            split between the processes that map them; forked writer processes share
            the rank's pages): what the whole command costs the machine.
Sampling can miss a peak shorter than 50 ms; the peak RSS column cannot. With
glibc's default (dynamic) mmap threshold, freed temporaries below 32 MiB may stay in
the heap and count as resident; --malloc-mmap-threshold separates them out.
Ratios are over the model's bytes (its unique parameters in --dtype): "RSS/model"
the peak RSS, "-base" the peak RSS less the baseline's, "anon-base" the anonymous
peak less the baseline's. A conversion that never holds two full copies of the
model stays well below 2 in the last two.

    python tools/bench_convert.py --verify --tp2
    python tools/bench_convert.py --tp2 --malloc-mmap-threshold 131072 --json bench_convert_mmap.json
    python tools/bench_convert.py --dtype fp32 --workdir /tmp/bench --keep --json bench_convert_fp32.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
CONVERT = REPO / "tools" / "convert_checkpoint.py"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QWEN25_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    architectures=["Qwen2ForCausalLM"])
# Qwen3-30B-A3B's ratios (top-8 of 128 experts, expert FFN 768 = 0.375 H, GQA 32/4 heads of
# 128) scaled to ~0.55B parameters: top-8 of 64 experts, expert FFN 256 = 0.33 H, one dense layer.
QWEN3_MOE_SMALL = dict(
    vocab_size=151936, hidden_size=768, intermediate_size=2048, moe_intermediate_size=256, num_hidden_layers=8,
    num_attention_heads=12, num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=8,
    norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=False, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6, router_aux_loss_coef=0.001, architectures=["Qwen3MoeForCausalLM"])
GIB = 2**30


# ------------------------------------------------------------------------------ model


def make_model(directory: Path, dtype: torch.dtype, seed: int, moe: bool = False) -> dict:
    """Write the random model to `directory`; its parameter count, bytes and build time."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3MoeConfig

    sys.path.insert(0, str(REPO))  # the test suite's weight redraw, shared with the convert tests
    from tests.hf_models import randomize

    started = time.monotonic()
    config = Qwen3MoeConfig(**QWEN3_MOE_SMALL) if moe else Qwen2Config(**QWEN25_05B)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    randomize(model, seed)
    model.save_pretrained(directory)
    params = list(model.parameters())  # tied embedding counted once
    info = {"shape": "Qwen3-MoE, 64 experts top-8 (Qwen3-30B-A3B ratios)" if moe else "Qwen2.5-0.5B dimensions",
            "params": sum(p.numel() for p in params),
            "bytes": sum(p.numel() * p.element_size() for p in params),
            "seconds": time.monotonic() - started,
            "peak_rss_bytes": _self_peak_rss()}
    del model, params
    return info


def _self_peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------ measurement


# Runs the command, waits for it with wait4 and writes its exit code, wall time and
# ru_maxrss. A separate small process, because Linux starts an exec'd child's maxrss at
# the high-water mark of the memory image it replaced: a child of this (large) process
# would report at least this process's peak.
_LAUNCHER = """
import json, os, subprocess, sys, time
started = time.monotonic()
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
child.returncode = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as out:
    json.dump({"rc": child.returncode, "seconds": time.monotonic() - started,
               "peak_rss_bytes": usage.ru_maxrss * 1024}, out)
"""


def _rollup_bytes(pid: int) -> dict:
    """Pss and Anonymous of `pid` from /proc/<pid>/smaps_rollup, in bytes ({} once it is gone)."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Pss", "Anonymous"):
                fields[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        return {}
    return fields


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


class TreeSampler(threading.Thread):
    """Samples the memory of the descendants of `pid` every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.tree_pss_peak = 0  # largest sum of Pss over the tree
        self.anon_peak = 0  # largest anonymous RSS of one process
        self.seen: set[int] = set()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            pids = [process.pid for process in _descendants(self.pid)]
            samples = [_rollup_bytes(pid) for pid in pids]
            self.tree_pss_peak = max(self.tree_pss_peak, sum(s.get("Pss", 0) for s in samples))
            self.anon_peak = max([self.anon_peak] + [s.get("Anonymous", 0) for s in samples])
            self.seen.update(pids)
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _kill_descendants(pid: int) -> None:
    """SIGKILL every descendant (torchrun starts its ranks in sessions of their own)."""
    for process in _descendants(pid):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def run_measured(argv: list[str], log: Path, env: dict, timeout: float) -> dict:
    """Run `argv` (output to `log`); its wall time, exit code and peak memory."""
    result_file = log.with_suffix(".result.json")
    with open(log, "wb") as output:
        started = time.monotonic()
        launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(result_file), *argv],
                                    stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = TreeSampler(launcher.pid)
        sampler.start()
        killer = threading.Timer(timeout, _kill_descendants, (launcher.pid,))
        killer.start()
        launcher.wait()
        killer.cancel()
        sampler.stop()
    if launcher.returncode != 0 or not result_file.is_file():
        raise RuntimeError(f"the launcher failed (exit code {launcher.returncode}), see {log}")
    result = json.loads(result_file.read_text())
    timed_out = result["rc"] == -signal.SIGKILL and time.monotonic() - started >= timeout
    return {**result, "tree_pss_peak_bytes": sampler.tree_pss_peak, "anon_peak_bytes": sampler.anon_peak,
            "processes": len(sampler.seen), "log": str(log), "timed_out": timed_out}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _tensor_files(directory: Path) -> dict[str, Path]:
    from safetensors import safe_open

    files = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            files.update({name: file for name in handle.keys()})
    return files


def compare_safetensors(expected_dir: Path, actual_dir: Path) -> dict:
    """Same tensor names, dtypes, shapes and bytes in both directories, one tensor at a time."""
    from safetensors import safe_open

    expected, actual = _tensor_files(expected_dir), _tensor_files(actual_dir)
    problems = [f"missing {name}" for name in sorted(set(expected) - set(actual))]
    problems += [f"unexpected {name}" for name in sorted(set(actual) - set(expected))]
    handles: dict[Path, object] = {}

    def get(file: Path, name: str) -> torch.Tensor:
        if file not in handles:
            handles[file] = safe_open(file, framework="pt")
        return handles[file].get_tensor(name)

    for name in sorted(set(expected) & set(actual)):
        a, b = get(expected[name], name), get(actual[name], name)
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{name}: {a.dtype} {tuple(a.shape)} became {b.dtype} {tuple(b.shape)}")
        elif not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            problems.append(f"{name}: values differ")
    return {"ok": not problems, "tensors": len(expected), "problems": problems[:10]}


# ---------------------------------------------------------------------------- steps


def plan_steps(args, work: Path) -> list[dict]:
    """The commands to time, in order: name, argv, output directory, what it needs."""
    python = sys.executable
    hf, megatron = work / "hf", work / "megatron"
    steps = [
        {"step": "baseline (imports)", "needs": None, "out": None,
         "argv": [python, "-c", "import torch, megatron.core, megatron_opd.checkpoint.convert"]},
        {"step": "hf-to-megatron tp1", "needs": None, "out": megatron,
         "argv": [python, str(CONVERT), "hf-to-megatron", "--hf-path", str(hf), "--out", str(megatron)]},
        {"step": "megatron-to-hf tp1", "needs": "hf-to-megatron tp1", "out": work / "hf_tp1",
         "argv": [python, str(CONVERT), "megatron-to-hf", "--megatron-path", str(megatron),
                  "--out", str(work / "hf_tp1")]},
    ]
    if args.tp2:
        steps.append({"step": "megatron-to-hf tp2", "needs": "hf-to-megatron tp1", "out": work / "hf_tp2",
                      "argv": [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(CONVERT), "megatron-to-hf", "--megatron-path", str(megatron),
                               "--out", str(work / "hf_tp2"), "--tp", "2"]})
    if args.moe:
        steps.append({"step": "megatron-to-hf ep2", "needs": "hf-to-megatron tp1", "out": work / "hf_ep2",
                      "argv": [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(CONVERT), "megatron-to-hf", "--megatron-path", str(megatron),
                               "--out", str(work / "hf_ep2"), "--ep", "2"]})
    if args.verify:
        steps.append({"step": "verify tp1", "needs": "hf-to-megatron tp1", "out": None,
                      "argv": [python, str(CONVERT), "verify", "--hf-path", str(hf), "--megatron-path",
                               str(megatron), "--seq-length", str(args.seq_length), "--batch-size", "1"]})
    return steps


def _log_tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _verify_line(log: Path) -> Optional[str]:
    found = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("verify:")]
    return found[-1] if found else None


def run_steps(steps: list[dict], work: Path, timeout: float, mmap_threshold: Optional[int]) -> list[dict]:
    env = {**os.environ, "MEGATRON_OPD_DEVICE": "cpu"}
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    (work / "logs").mkdir()
    results = []
    for step in steps:
        if step["needs"] and not any(r["step"] == step["needs"] and r["rc"] == 0 for r in results):
            results.append({"step": step["step"], "rc": None, "status": f"skipped: {step['needs']} failed"})
            continue
        print(f"running {step['step']}: {' '.join(step['argv'][1:])}", flush=True)
        log = work / "logs" / (re.sub(r"\W+", "_", step["step"]).strip("_") + ".log")
        result = {"step": step["step"], **run_measured(step["argv"], log, env, timeout)}
        result["status"] = ("ok" if result["rc"] == 0 else
                            "timed out" if result["timed_out"] else f"rc={result['rc']}")
        if step["out"] is not None:
            result["output_bytes"] = dir_bytes(step["out"])
        if step["step"].startswith("verify"):
            result["verify"] = _verify_line(log)
        if result["rc"] != 0:
            print(f"  {result['status']}; last lines of {log}:\n{_log_tail(log)}", flush=True)
        results.append(result)
    return results


def check_round_trips(results: list[dict], work: Path) -> None:
    for result in results:
        if result["step"].startswith("megatron-to-hf") and result["rc"] == 0:
            started = time.monotonic()
            out = work / ("hf_" + result["step"].rsplit(" ", 1)[-1])
            result["round_trip"] = compare_safetensors(work / "hf", out)
            result["round_trip"]["seconds"] = time.monotonic() - started


# ---------------------------------------------------------------------------- report


def _gib(value: Optional[int]) -> str:
    return f"{value / GIB:.2f}" if value else "-"


def _ratio(value: int, base: int, model_bytes: int) -> str:
    return f"{(value - base) / model_bytes:.2f}"


def print_report(model: dict, results: list[dict]) -> None:
    base = next((r for r in results if r["step"].startswith("baseline") and r["rc"] == 0), None)
    base_rss, base_anon = (base["peak_rss_bytes"], base["anon_peak_bytes"]) if base else (0, 0)
    print(f"\nmodel: {model['shape']}, {model['params']:,} params, {model['dtype']}, "
          f"{model['bytes'] / GIB:.3f} GiB ({model['bytes']:,} bytes); built and saved in "
          f"{model['seconds']:.1f}s (in this process, peak RSS {_gib(model['peak_rss_bytes'])} GiB)")
    print(f"baseline (python + torch + megatron.core + converter imports): peak RSS {_gib(base_rss)} GiB, "
          f"anonymous {_gib(base_anon)} GiB\n")
    header = (f"{'step':20} {'status':8} {'seconds':>7} {'peak RSS':>8} {'anon':>5} {'tree':>5} "
              f"{'output':>6} | {'RSS/model':>9} {'-base':>5} {'anon-base':>9}")
    print(header)
    print(f"{'':37} {'GiB':>8} {'GiB':>5} {'GiB':>5} {'GiB':>6} |")
    print("-" * len(header))
    for r in results:
        if r["rc"] is None:
            print(f"{r['step']:20} {r['status']}")
            continue
        rss, anon = r["peak_rss_bytes"], r["anon_peak_bytes"]
        ratios = "" if r is base else (f"{_ratio(rss, 0, model['bytes']):>9} "
                                       f"{_ratio(rss, base_rss, model['bytes']):>5} "
                                       f"{_ratio(anon, base_anon, model['bytes']):>9}")
        print(f"{r['step']:20} {r['status'][:8]:8} {r['seconds']:7.1f} {_gib(rss):>8} {_gib(anon):>5} "
              f"{_gib(r['tree_pss_peak_bytes']):>5} {_gib(r.get('output_bytes')):>6} | {ratios}")
    print()
    for r in results:
        if "round_trip" in r:
            trip = r["round_trip"]
            verdict = "PASS" if trip["ok"] else "FAIL " + "; ".join(trip["problems"])
            print(f"round trip hf -> megatron -> hf ({r['step']}): {trip['tensors']} tensors "
                  f"bit-identical: {verdict} (checked in {trip['seconds']:.1f}s)")
        if r.get("verify"):
            print(r["verify"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="of the HF model (default bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp2", action="store_true", help="also megatron-to-hf under torchrun, 2 ranks, --tp 2")
    parser.add_argument("--verify", action="store_true", help="also `convert verify` (fp32 forward of both)")
    parser.add_argument("--moe", action="store_true",
                        help="a Qwen3-MoE model (Qwen3-30B-A3B ratios, ~0.55B), plus megatron-to-hf at --ep 2")
    parser.add_argument("--seq-length", type=int, default=32, help="for --verify (batch size 1)")
    parser.add_argument("--workdir", type=Path, help="where models go (must be empty); default a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (models, per-step logs)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per step")
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ for the steps (e.g. 131072): freed "
                             "temporaries then go back to the OS, so the peaks show what the converter "
                             "holds, not what the allocator keeps (default: glibc's dynamic threshold)")
    parser.add_argument("--json", default="bench_convert.json")
    args = parser.parse_args()
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty")
    started = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"work dir {work}; making the random model", flush=True)
        model = {"dtype": args.dtype, **make_model(work / "hf", DTYPES[args.dtype], args.seed, args.moe)}
        results = run_steps(plan_steps(args, work), work, args.timeout, args.malloc_mmap_threshold)
        check_round_trips(results, work)
        if args.malloc_mmap_threshold is not None:
            print(f"\nsteps ran with MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}")
        print_report(model, results)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - started
    record = {"model": model, "config": QWEN3_MOE_SMALL if args.moe else QWEN25_05B, "steps": results, "total_seconds": total,
              "cpus": os.cpu_count(), "torch": torch.__version__, "argv": sys.argv[1:]}
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"total {total:.1f}s; wrote {args.json}")
    failed = [r["step"] for r in results if r["rc"] != 0 or not r.get("round_trip", {"ok": True})["ok"]]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
