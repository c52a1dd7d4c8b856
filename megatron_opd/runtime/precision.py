"""`training.precision` -> the dtype models are built in, for the device the run has."""

from __future__ import annotations

import torch

_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPU and fp32 on CPU (CPU mode computes bf16, slowly)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in _PRECISION:
        raise ValueError(f"training.precision={precision!r} is invalid: one of ['auto', {', '.join(map(repr, _PRECISION))}]")
    return _PRECISION[precision]
