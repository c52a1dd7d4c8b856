"""RMSNorm for Megatron's local (non-Transformer-Engine) layer spec.

Megatron-Core's local spec normalizes with `WrappedTorchNorm`, which asserts that
sequence parallelism is off, or with apex's fused norm, which needs CUDA. This is
the same math as Hugging Face's `LlamaRMSNorm` / `Qwen2RMSNorm` (fp32 statistics,
weight applied after casting back), usable on sequence-parallel shards: its weight
is marked `sequence_parallel`, so Megatron's `finalize_model_grads` sums the
partial weight gradients of the sequence shards across tensor-parallel ranks.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dim of `[..., hidden_size]`."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm built for normalization={config.normalization!r}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        states = hidden_states.float()
        states = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * states.to(hidden_states.dtype)
