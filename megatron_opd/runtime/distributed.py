"""Start torch.distributed and Megatron's parallel state for one run.

`initialize_runtime` is the single entry point: it picks the device (CUDA + NCCL,
or CPU + gloo with CPU mode installed), joins the process group that torchrun
describes in the environment (or a one-process group when run without torchrun),
creates Megatron's tensor/pipeline/data-parallel groups and seeds every generator
the way Megatron-LM does.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.runtime import cpu_mode, quiet

DEVICE_ENV = "MEGATRON_OPD_DEVICE"
CPU_THREADS_ENV = "MEGATRON_OPD_CPU_THREADS"
_DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Runtime:
    """What this process is part of, once `initialize_runtime` has run."""

    device: torch.device
    backend: str
    rank: int
    world_size: int
    local_rank: int
    parallel: ParallelConfig
    # gloo, every rank, HOST_WAIT_TIMEOUT: for ranks waiting on another's host work (tokenizing
    # a dataset), which may take far longer than a collective's timeout allows
    host_wait_group: Any = field(default=None, compare=False, repr=False)

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def data_parallel_size(self) -> int:
        return self.parallel.data_parallel_size(self.world_size)


def resolve_device(requested: str | None = None) -> str:
    """'cuda' or 'cpu' from `requested`, else `$MEGATRON_OPD_DEVICE`, else what the machine has."""
    choice = requested or os.environ.get(DEVICE_ENV, "auto")
    if choice not in _DEVICE_CHOICES:
        raise ValueError(f"{DEVICE_ENV}={choice!r} is invalid: one of {list(_DEVICE_CHOICES)}")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}=cuda but torch sees no CUDA device (torch {torch.__version__})")
    return choice


def _positive_int(name: str, value: str, meaning: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name}={value!r} is invalid: a positive integer ({meaning})")
    return number


def cpu_threads_per_rank(environ=os.environ) -> tuple[int, str]:
    """Intra-op threads for each CPU-mode rank, and where that number came from.

    Which wins, and why:
      1. `MEGATRON_OPD_CPU_THREADS`: this program's own knob, so it is meant for this run,
         whereas OMP_NUM_THREADS is often exported for a whole shell or cluster job;
      2. `OMP_NUM_THREADS`: the user's (or torchrun's, which sets 1 for multi-process
         jobs) statement about this machine, which can allow for other jobs on it;
      3. the CPUs this process may run on (its affinity) split evenly over this node's
         ranks (`LOCAL_WORLD_SIZE`, set by torchrun; 1 without it), at least 1: a guess
         that cannot see other jobs, so it comes last.
    """
    override = environ.get(CPU_THREADS_ENV, "").strip()
    if override:
        return _positive_int(CPU_THREADS_ENV, override, "intra-op threads per CPU-mode rank"), CPU_THREADS_ENV
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        # OpenMP allows a list for nested levels ("4,2"); the first is the outer one.
        return _positive_int("OMP_NUM_THREADS", omp.split(",")[0].strip(), "threads per process"), "OMP_NUM_THREADS"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = _positive_int("LOCAL_WORLD_SIZE", environ.get("LOCAL_WORLD_SIZE", "1"), "ranks on this node")
    return max(1, cpus // local_ranks), f"{cpus} CPUs / {local_ranks} local rank{'s' if local_ranks != 1 else ''}"


def _join_process_group(backend: str, timeout: datetime.timedelta) -> None:
    if "RANK" not in os.environ:
        # Plain `python -m ...`: a one-rank group, so the same code runs without torchrun.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    single_node = os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")
    if backend == "gloo" and single_node:
        # Ranks on one machine talk over loopback; gloo would otherwise bind to the
        # interface the hostname resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, timeout=timeout)


def seed_everything(seed: int) -> None:
    # As Megatron-LM: one seed per pipeline stage; Megatron's tracker then derives
    # the tensor-parallel streams from it.
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    # torch.manual_seed also queues lazy seeds for XPU and MTIA, each capturing a stack trace:
    # 0.5 ms of a toy step, and the trainer seeds every step. CPU and CUDA are the devices here.
    torch.default_generator.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


# Waiting for rank 0 to tokenize a dataset is not a hang: tokenizing a billion-token
# dataset takes hours. torchrun ends the other ranks when the tokenizing one fails.
HOST_WAIT_TIMEOUT = datetime.timedelta(hours=24)


def initialize_runtime(
    parallel: ParallelConfig,
    device: str | None = None,
    timeout: datetime.timedelta = datetime.timedelta(minutes=30),
) -> Runtime:
    """Join the process group and build Megatron's parallel groups for `parallel`.

    Idempotent for the same layout; raises if Megatron's groups already exist with
    another one.
    """
    device_type = resolve_device(device)
    cpu_threads = None
    if device_type == "cpu":
        # Without this every rank runs as many intra-op threads as the machine has CPUs:
        # 2 ranks x 2 threads on a busy 2-core machine made GKD steps 5-17x slower than
        # 1 thread each (7 alternating pairs, median 9x; tools/bench_train.py sizes).
        cpu_threads = cpu_threads_per_rank()
        torch.set_num_threads(cpu_threads[0])
        cpu_mode.install(force=torch.cuda.is_available())
        backend = "gloo"
    else:
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        _join_process_group(backend, timeout)
    elif dist.get_backend() != backend:
        raise RuntimeError(f"torch.distributed already runs {dist.get_backend()!r}, need {backend!r}")
    world_size = dist.get_world_size()
    parallel.data_parallel_size(world_size)

    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    ep, etp = parallel.expert_model_parallel_size, parallel.expert_tensor_size
    if parallel_state.model_parallel_is_initialized():
        existing = (parallel_state.get_tensor_model_parallel_world_size(),
                    parallel_state.get_pipeline_model_parallel_world_size(),
                    parallel_state.get_expert_model_parallel_world_size(),
                    parallel_state.get_expert_tensor_parallel_world_size())
        if existing != (tp, pp, ep, etp):
            raise RuntimeError(f"Megatron parallel state already initialized with (tp, pp, ep, etp)={existing}")
    else:
        # Experts: ep x etp ranks per expert layer, the rest of the world their data parallel.
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
        )
    seed_everything(parallel.seed)
    host_wait_group = dist.new_group(backend="gloo", timeout=HOST_WAIT_TIMEOUT)
    quiet.print_mode_line(dist.get_rank(), device_type, backend, world_size, cpu_threads)
    return Runtime(
        device=torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda"
        else torch.device("cpu"),
        backend=backend,
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        parallel=parallel,
        host_wait_group=host_wait_group,
    )


def destroy_runtime() -> None:
    """Tear down Megatron's groups and the process group (CPU mode stays installed)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
