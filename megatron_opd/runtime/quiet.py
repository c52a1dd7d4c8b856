"""Megatron-Core's notices about missing optional packages, and the one line that replaces them.

Megatron-Core 0.16 reports each GPU-only package it does not find with `warnings.warn`
(a `UserWarning`) in an `except ImportError:` branch that runs when the module is
imported, so every command printed six of them before its own output, `--help` included:

    megatron/core/optimizer/__init__.py    Transformer Engine and Apex are not installed. Falling back to Torch optimizers.
    megatron/core/optimizer/optimizer.py   Transformer Engine and Apex are not installed. Falling back to local
    megatron/core/optimizer/clip_grads.py      implementations of multi_tensor_applier, ... (the same notice
    megatron/core/distributed/fsdp/src/megatron_fsdp/mixed_precision.py   from all three)
    megatron/core/models/backends.py       Apex is not installed. Falling back to Torch Norm
    megatron/core/models/gpt/gpt_layer_specs.py   (the same; also the T5/BERT/vision/multimodal specs)

and `megatron/core/hyper_comm_grid.py` warns the same way when `absl` is missing. Nothing
is logged or printed at import besides these (`logging` calls there are at INFO level).

`silence_optional_package_notices()` ignores exactly these messages, and only when they
come from `megatron.core` modules, and torch's two deprecation notices that every checkpoint
load through Megatron-Core's dist-checkpointing printed; every other warning stays visible. `megatron_opd`'s
`__init__` calls it, so it is in place before any module of the package imports
Megatron-Core, whatever the entry point. What the notices said is in `mode_line()`
instead, detected rather than assumed, and `initialize_runtime` prints it once, on
rank 0, when a command starts running.

This module imports only the standard library at import time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
import warnings
from typing import Optional

# Regexes matched against the start of the message (warnings' `message` filter).
OPTIONAL_PACKAGE_NOTICES = (
    r"Transformer Engine and Apex are not installed\. Falling back to ",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"absl\.logging is not installed\. Using logging\.getLogger",
)
_MEGATRON_MODULES = r"megatron\.core(\.|$)"
# torch's deprecation notices about APIs Megatron-Core 0.16's dist-checkpointing calls when
# it loads a checkpoint (every resume printed both): nothing a user of ours can change.
DIST_CHECKPOINTING_DEPRECATIONS = (
    r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load` instead",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
)

_printed = False


# Log records (logger -> message start) that every run printed on Megatron-Core 0.19 with
# torch's CUDA build on a CPU machine, none about anything this project does or can change:
# torch's note on compiling extensions (which we never do), Megatron's notice that GPTModel
# (the model this project builds, still supported) is deprecated in favour of HybridModel,
# once per model, and its notice about an async-save strategy we do not use.
DROPPED_LOG_RECORDS = {
    "torch.utils.cpp_extension": "No CUDA runtime is found",
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
}
# Warnings of the same kind on 0.19: an experimental class imported with the package (we do
# not use it), and torch's distributed-checkpoint notices when Megatron reads a checkpoint's
# metadata outside a collective.
MEGATRON_019_NOTICES = (
    r"MimoModelConfig is experimental",
    r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load",
    r"The argument order of load has been changed",
)


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def silence_optional_package_notices() -> None:
    """Ignore Megatron-Core's missing-optional-package warnings (idempotent)."""
    for name, prefix in DROPPED_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropRecords(prefix))
    for message in MEGATRON_019_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    for message in OPTIONAL_PACKAGE_NOTICES:
        # filterwarnings drops an identical filter before inserting, so calls do not pile up.
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=_MEGATRON_MODULES)
    for message in DIST_CHECKPOINTING_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def _version(module_name: str, distributions: tuple[str, ...]) -> Optional[str]:
    """The installed version of `module_name`, '' if installed without one, None if absent."""
    module = sys.modules.get(module_name)
    if module is None and importlib.util.find_spec(module_name) is None:
        return None
    version = getattr(module, "__version__", None)
    for distribution in distributions:
        if version:
            break
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            pass
    return version or ""


def transformer_engine_version() -> Optional[str]:
    return _version("transformer_engine", ("transformer_engine", "transformer-engine", "transformer_engine_torch"))


def apex_version() -> Optional[str]:
    # NVIDIA apex with its CUDA extensions (amp_C), which is what Megatron-Core's fused
    # optimizer and norm paths need; PyPI's unrelated `apex` has no amp_C.
    if importlib.util.find_spec("amp_C") is None:
        return None
    return _version("apex", ("apex",))


def _named(name: str, version: Optional[str]) -> str:
    if version is None:
        return f"no {name}"
    return f"{name} {version}".rstrip()


def mode_line(device_type: str, backend: str, world_size: int, cpu_threads: Optional[tuple[int, str]] = None) -> str:
    """One line saying how this run executes: device, backend, ranks, threads, optional packages.

    `cpu_threads` is (intra-op threads per rank, where that number came from) in CPU mode.
    """
    import torch

    parts = []
    ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
    if device_type == "cpu":
        parts.append(f"CPU mode ({backend}), {ranks}")
        if cpu_threads is not None:
            threads, source = cpu_threads
            parts.append(f"{threads} intra-op thread{'s' if threads != 1 else ''} per rank ({source})")
    else:
        parts.append(f"CUDA ({backend.upper()}), {ranks}, {torch.cuda.get_device_name()}")
    te = _named("Transformer Engine", transformer_engine_version())
    apex = _named("Apex", apex_version())
    if device_type == "cpu":
        te = te if te.startswith("no ") else f"{te} (unused on CPU)"
        apex = apex if apex.startswith("no ") else f"{apex} (unused on CPU)"
    parts += [te, apex]
    try:
        megatron_core = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        megatron_core = "?"
    return f"megatron_opd: {', '.join(parts)}; torch {torch.__version__}, megatron-core {megatron_core}"


def print_mode_line(rank: int, *args, **kwargs) -> None:
    """`mode_line(*args, **kwargs)` to stderr, once per process, on rank 0 only."""
    global _printed
    if rank != 0 or _printed:
        return
    _printed = True
    print(mode_line(*args, **kwargs), file=sys.stderr, flush=True)
