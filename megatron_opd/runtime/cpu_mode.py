"""CPU mode: run unmodified Megatron-Core on CPU tensors with the gloo backend.

Megatron-Core assumes CUDA on the code paths we use (model construction, tensor-
and sequence-parallel mappings, the pipeline schedules, DDP grad buffers,
`finalize_model_grads`, the optimizer). It does so in exactly three ways, and this
module redirects each of them to the CPU, for the whole process:

1. Device placement. Megatron allocates with `device=torch.cuda.current_device()`,
   also inside autograd backward functions, where torch function modes are not
   active. So `torch.cuda.current_device()` returns `torch.device("cpu")` (valid
   wherever Megatron passes it as a device). The remaining forms, `device="cuda"`
   literals (pipeline schedules, attention masks), `.cuda()` and `.to("cuda")`,
   are rewritten to CPU by a `TorchFunctionMode`. The one backward that runs them
   is activation recomputation (`CheckpointFunction.backward`,
   `CheckpointWithoutOutput._recompute` replay the forward), so those run inside a
   mode of their own.
2. Other `torch.cuda` utilities: `device_count` (1), `set_device`, `synchronize`,
   `empty_cache` (no-ops). They would otherwise raise on a CPU build (or, on a CUDA
   build without a GPU, initialize CUDA in a forked process). Megatron-Core 0.19 also
   orders its DDP grad reduction on streams (`param_and_grad_buffer.start_grad_sync`
   takes `torch.cuda.current_stream()` and waits on events; 0.16 did not):
   `current_stream` and `default_stream` return one `_CpuStream`, whose waits are
   no-ops, since CPU kernels and gloo collectives complete in program order.
3. Random state. Megatron's `CudaRNGStatesTracker` forks the *CUDA* generator so
   that dropout and weight init differ across TP ranks where they must. On CPU the
   generator that CPU kernels draw from is the default CPU generator, so the CUDA
   RNG functions (`torch.cuda.{get,set}_rng_state`, `manual_seed[_all]`, and
   Megatron's private `_get_cuda_rng_state` / `_set_cuda_rng_state`, whose lazy
   CUDA call would never run) are backed by it. The tracker's "CPU RNG state
   changed within GPU RNG context" warning is then true by construction and is
   filtered out.

Also: `Tensor.type()` with no argument reports `torch.cuda.*Tensor` for CPU tensors,
because Megatron's optimizer and grad clipping assert those type strings.

Gloo in torch >= 2.6 provides every collective Megatron uses here (all-gather and
reduce-scatter into tensors, batched isend/irecv), so no collective is redirected.

The mode sees every torch call of the process (~1,700 per step of the quickstart's GKD step,
6-8% of it). `suspended()` lifts it over a region that makes no CUDA allocation by literal:
a dense model's forward (`models.outputs.forward_hidden_states`), whose only such allocation,
the causal mask of Megatron's own attention, runs under `redirecting()` (`SDPAttention`'s
fallback). Mixture-of-experts layers allocate with `device="cuda"` in their routers and
dispatchers, so their forward keeps the mode.

Install it only when the run is meant for CPU (`install()` refuses when CUDA is
available unless forced): on a GPU run none of this must be active.
`megatron_opd.runtime.initialize_runtime` is the one place that calls it.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_RNG_WARNING = "CPU RNG state changed within GPU RNG context"


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a bare index means an accelerator device
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to CPU (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            type_name = func(*args)
            return type_name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else type_name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and any(_is_cuda_device(arg) for arg in args[1:]):
            args = tuple(_CPU if _is_cuda_device(arg) else arg for arg in args)
        return func(*args, **kwargs)


def _recompute_in_cpu_mode(recompute: Callable) -> Callable:
    """`recompute` (a forward replayed in the backward, where the process's mode is not
    active) run under the mode, so its `device="cuda"` allocations land on the CPU too."""

    def in_cpu_mode(*args, **kwargs):
        with _CudaToCpuMode():
            return recompute(*args, **kwargs)

    in_cpu_mode.__name__ = in_cpu_mode.__qualname__ = recompute.__name__
    return in_cpu_mode


class _DropRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _RNG_WARNING not in record.getMessage()


def _get_rng_state(*args, clone: bool = False, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _seed(seed: int) -> None:
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, i.e. back into us.
    torch.default_generator.manual_seed(int(seed))


def _noop(name: str) -> Callable[..., None]:
    """A no-op stand-in for `torch.cuda.<name>`. One function object per name: torch.compile
    (Megatron's `jit_fuser`, at import) maps torch functions to tracing rules by identity
    and refuses one object under two names with different rules."""

    def noop(*args, **kwargs) -> None:
        return None

    noop.__name__ = noop.__qualname__ = name
    return noop


class _CpuStream:
    """What `torch.cuda.current_stream()` / `default_stream()` return in CPU mode: a stream on
    which every operation has already completed (CPU ops run in program order)."""

    device = _CPU

    def wait_event(self, event: Any) -> None:
        return None

    def wait_stream(self, stream: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> Any:
        return event

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()


def _current_stream(device: Any = None) -> _CpuStream:
    return _CPU_STREAM


def _default_stream(device: Any = None) -> _CpuStream:
    return _CPU_STREAM


class _CpuModeState:
    """What `install()` replaced, so that `uninstall()` can restore it exactly."""

    def __init__(self) -> None:
        self.saved: list[tuple[Any, str, Any]] = []
        self.mode: Optional[_CudaToCpuMode] = None
        self.log_filter = _DropRngWarning()

    def patch(self, owner: Any, name: str, replacement: Callable) -> None:
        # A class keeps its raw attribute (a staticmethod stays one when restored).
        original = owner.__dict__[name] if isinstance(owner, type) and name in owner.__dict__ else getattr(owner, name)
        self.saved.append((owner, name, original))
        setattr(owner, name, replacement)


_state: Optional[_CpuModeState] = None


def is_installed() -> bool:
    return _state is not None


def install(force: bool = False) -> None:
    """Redirect Megatron-Core's CUDA assumptions to the CPU for this process.

    Idempotent. Raises when CUDA is available, unless `force` (the user asked for
    CPU explicitly with `MEGATRON_OPD_DEVICE=cpu`).
    """
    global _state
    if _state is not None:
        return
    if torch.cuda.is_available() and not force:
        raise RuntimeError(
            "CPU mode must not be installed on a machine with CUDA; "
            "set MEGATRON_OPD_DEVICE=cpu to force a CPU run"
        )
    import megatron.core.tensor_parallel.random as megatron_random

    state = _CpuModeState()
    state.patch(torch.cuda, "current_device", lambda: _CPU)
    state.patch(torch.cuda, "device_count", lambda: 1)
    for name in ("set_device", "synchronize", "empty_cache"):
        state.patch(torch.cuda, name, _noop(name))
    state.patch(torch.cuda, "current_stream", _current_stream)
    state.patch(torch.cuda, "default_stream", _default_stream)
    for owner in (torch.cuda, torch.cuda.random):
        state.patch(owner, "get_rng_state", _get_rng_state)
        state.patch(owner, "set_rng_state", _set_rng_state)
        state.patch(owner, "manual_seed", _seed)
        state.patch(owner, "manual_seed_all", _seed)
    state.patch(megatron_random, "_get_cuda_rng_state", _get_rng_state)
    state.patch(megatron_random, "_set_cuda_rng_state", _set_rng_state)
    state.patch(megatron_random.CheckpointFunction, "backward",
                staticmethod(_recompute_in_cpu_mode(megatron_random.CheckpointFunction.backward)))
    state.patch(megatron_random.CheckpointWithoutOutput, "_recompute",
                _recompute_in_cpu_mode(megatron_random.CheckpointWithoutOutput._recompute))
    logging.getLogger(megatron_random.__name__).addFilter(state.log_filter)
    # Megatron's sequence-parallel layers advise a CUDA setting on every construction.
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    state.mode = _CudaToCpuMode()
    state.mode.__enter__()
    _state = state


@contextmanager
def suspended() -> Iterator[None]:
    """The device redirection lifted for the region (see the module docstring), when CPU mode is
    installed and its mode is the innermost one (else the region runs as it is: correct, only
    slower)."""
    mode = _state.mode if _state is not None else None
    stack = torch.overrides._get_current_function_mode_stack()
    if mode is None or not stack or stack[-1] is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


@contextmanager
def redirecting() -> Iterator[None]:
    """The device redirection for the region, inside a `suspended()` one (a no-op outside CPU mode)."""
    if _state is None:
        yield
        return
    with _CudaToCpuMode():
        yield


def uninstall() -> None:
    """Undo `install()` (tests use it to leave the process as they found it)."""
    global _state
    if _state is None:
        return
    import megatron.core.tensor_parallel.random as megatron_random

    _state.mode.__exit__(None, None, None)
    logging.getLogger(megatron_random.__name__).removeFilter(_state.log_filter)
    for owner, name, original in reversed(_state.saved):
        setattr(owner, name, original)
    _state = None
