"""Process-level runtime: distributed init, Megatron parallel state, CPU mode.

Importing this package is cheap (standard library only): `megatron_opd/__init__.py`
imports `quiet` from it before anything imports Megatron-Core, so the names below are
loaded from `distributed` (torch, Megatron-Core) on first use.
"""

from typing import TYPE_CHECKING

from megatron_opd.runtime.quiet import silence_optional_package_notices

if TYPE_CHECKING:
    from megatron_opd.runtime.distributed import (
        DEVICE_ENV,
        Runtime,
        destroy_runtime,
        initialize_runtime,
        resolve_device,
    )

__all__ = ["DEVICE_ENV", "Runtime", "destroy_runtime", "initialize_runtime", "resolve_device",
           "silence_optional_package_notices"]


def __getattr__(name: str):
    if name in __all__:
        from megatron_opd.runtime import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
