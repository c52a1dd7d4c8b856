"""`training.precision` -> the dtype models are built in, for the device the run has.

Only weights and activations take this dtype: softmax statistics and divergences are fp32
(`ops.vocab_parallel.compute_dtype`), gradients are accumulated and reduced in fp32 and the
optimizer keeps fp32 master weights (`trainer.optim`); fp16 adds a dynamic loss scale
(`Trainer` sets Megatron's `grad_scale_func`). The table is in docs/design.md, section 2.7.
"""

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
