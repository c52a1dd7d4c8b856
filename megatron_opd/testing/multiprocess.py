"""Run one function on W gloo ranks and hand each rank's return value back to the caller.

    results = run_distributed(check_tp_forward, world_size=2, batch=batch)
    # results[r] is what check_tp_forward(batch=batch) returned on rank r

Each rank is a fresh process with the environment torchrun would give it
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on loopback) and
`MEGATRON_OPD_DEVICE=cpu`, so the function starts Megatron exactly as a real run
does, through `megatron_opd.runtime.initialize_runtime`.

Ranks fork from a forkserver that has already imported torch and megatron-core, so
a rank starts in well under a second instead of the several seconds an import
takes. Results travel through `torch.save` files, not pipes, so large tensors
cannot deadlock the parent. When a rank raises, the others (likely stuck in a
collective) are killed and the error shows that rank's traceback; when the
timeout passes, every live rank's Python stacks are dumped (faulthandler) and
shown, so a hang says where it hangs.

`torch.multiprocessing.spawn` and torch's own `MultiProcessTestCase` do neither of
the last two for free functions with return values, hence this module.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

MAX_WORLD_SIZE = 8
_PRELOAD = ["torch", "megatron.core", "megatron.core.models.gpt"]


class DistributedTestError(AssertionError):
    """A rank raised, died, or the run timed out; the message carries the evidence."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _exit_when_caller_dies(caller_pid: int) -> None:
    """Ranks are children of the forkserver, not of the caller: end with the caller."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(caller_pid, 0)
            except ProcessLookupError:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="caller-watchdog").start()


def _rank_main(
    fn: Callable, args: tuple, kwargs: dict, rank: int, env: dict[str, str], out_dir: str
) -> None:
    _exit_when_caller_dies(int(env["MEGATRON_OPD_CALLER_PID"]))
    os.environ.update(env)
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
    out = Path(out_dir)
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    stacks = open(out / f"rank{rank}.stacks", "w")
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        result = fn(*args, **kwargs)
        torch.save(result, out / f"rank{rank}.tmp")
        os.replace(out / f"rank{rank}.tmp", out / f"rank{rank}.pt")
        exit_code = 0
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        exit_code = 1
    # Skip interpreter and process-group teardown (a peer may already be gone), but end
    # this rank's own children, e.g. the Manager process dist-checkpointing keeps for its
    # writers, which normal interpreter exit would have shut down.
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(5.0)
    stacks.close()
    os._exit(exit_code)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    env: Optional[dict[str, str]] = None,
    **kwargs: Any,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return the results by rank.

    `fn` must be importable by name (a module-level function). Raises
    `DistributedTestError` naming the failing rank with its traceback, or after
    `timeout` seconds with the stacks of the ranks still running.
    """
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise ValueError(f"world_size={world_size} is invalid: 1 to {MAX_WORLD_SIZE}")
    context = _context()
    rank_env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GLOO_SOCKET_IFNAME": "lo",
        "MEGATRON_OPD_DEVICE": "cpu",
        "MEGATRON_OPD_CALLER_PID": str(os.getpid()),
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world_size)),
        **(env or {}),
    }
    with tempfile.TemporaryDirectory(prefix="megatron_opd_ranks_") as out_dir:
        out = Path(out_dir)
        # Not daemonic: ranks may start processes of their own (dist-checkpointing's
        # writers); the watchdog and the failure path below end them instead.
        procs = [
            context.Process(target=_rank_main, args=(fn, args, kwargs, rank, rank_env, out_dir),
                            name=f"rank{rank}", daemon=False)
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        failure = None
        while any(proc.is_alive() for proc in procs):
            if any(proc.exitcode not in (None, 0) for proc in procs):
                failure = "failed"
                _join_all(procs, grace=3.0)
                break
            if time.monotonic() > deadline:
                failure = "timed out"
                break
            time.sleep(0.02)
        if failure is None and any(proc.exitcode != 0 for proc in procs):
            failure = "failed"
        if failure is not None:
            raise DistributedTestError(_report(fn, procs, out, failure, timeout))
        return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _join_all(procs: list, grace: float) -> None:
    end = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.0, end - time.monotonic()))


def _report(fn: Callable, procs: list, out: Path, failure: str, timeout: float) -> str:
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for rank in hung:
        os.kill(procs[rank].pid, signal.SIGUSR1)
    time.sleep(0.5)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join(5.0)
    name = getattr(fn, "__qualname__", repr(fn))
    lines = [f"{name} on {len(procs)} rank(s) {failure}"
             + (f" after {timeout:.0f}s" if failure == "timed out" else "")]
    for rank, proc in enumerate(procs):
        error = _read(out / f"rank{rank}.err")
        if error:
            lines.append(f"--- rank {rank} raised:\n{error}")
        elif rank in hung:
            lines.append(f"--- rank {rank} was still running; its stacks:\n"
                         f"{_read(out / f'rank{rank}.stacks') or '(none dumped)'}")
        elif proc.exitcode != 0:
            lines.append(f"--- rank {rank} died with exit code {proc.exitcode}")
    return "\n".join(lines)
