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
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.runtime import cpu_mode

DEVICE_ENV = "MEGATRON_OPD_DEVICE"
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
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


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
    if device_type == "cpu":
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
    if parallel_state.model_parallel_is_initialized():
        existing = (parallel_state.get_tensor_model_parallel_world_size(),
                    parallel_state.get_pipeline_model_parallel_world_size())
        if existing != (tp, pp):
            raise RuntimeError(f"Megatron parallel state already initialized with (tp, pp)={existing}")
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        )
    seed_everything(parallel.seed)
    return Runtime(
        device=torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda"
        else torch.device("cpu"),
        backend=backend,
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        parallel=parallel,
    )


def destroy_runtime() -> None:
    """Tear down Megatron's groups and the process group (CPU mode stays installed)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
