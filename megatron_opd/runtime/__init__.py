"""Process-level runtime: distributed init, Megatron parallel state, CPU mode."""

from megatron_opd.runtime.distributed import (
    DEVICE_ENV,
    Runtime,
    destroy_runtime,
    initialize_runtime,
    resolve_device,
)

__all__ = ["DEVICE_ENV", "Runtime", "destroy_runtime", "initialize_runtime", "resolve_device"]
