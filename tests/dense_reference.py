"""A plain float64 PyTorch decoder with no Megatron code: the independent reference.

It reads the full weights by the names `tests.tiny_models.reference_state_dict`
uses and follows the published architecture (Llama / Qwen): RMSNorm pre-norm,
grouped-query attention with rotate-half RoPE and optional QK-norm, SwiGLU MLP.
The fused QKV weight is read in Megatron's layout, `[groups, q_heads_per_group + 2,
head_dim]` rows: each group's query heads, then its key, then its value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_opd.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """x: [b, heads, s, d]."""
    seq, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return x * angles.cos() + rotate_half(x) * angles.sin()


def dense_logits(config: ModelConfig, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """tokens `[b, s]` -> logits `[b, s, padded_vocab]`, in the dtype of `state`."""
    eps, d = config.norm_epsilon, config.head_dim
    groups = config.query_groups
    q_per_group = config.num_attention_heads // groups
    x = state["embedding.word_embeddings.weight"][tokens]
    b, s, _ = x.shape
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    for layer in range(config.num_layers):
        p = lambda name: state.get(f"decoder.layers.{layer}.{name}")  # noqa: E731
        h = rms_norm(x, p("input_layernorm.weight"), eps)
        qkv = h @ p("self_attention.linear_qkv.weight").T
        if config.add_qkv_bias:
            qkv = qkv + p("self_attention.linear_qkv.bias")
        qkv = qkv.view(b, s, groups, q_per_group + 2, d)
        q = qkv[:, :, :, :q_per_group].reshape(b, s, groups * q_per_group, d).transpose(1, 2)
        k = qkv[:, :, :, q_per_group].transpose(1, 2)  # [b, groups, s, d]
        v = qkv[:, :, :, q_per_group + 1].transpose(1, 2)
        if config.qk_layernorm:
            q = rms_norm(q, p("self_attention.q_layernorm.weight"), eps)
            k = rms_norm(k, p("self_attention.k_layernorm.weight"), eps)
        q, k = apply_rope(q, config.rotary_base), apply_rope(k, config.rotary_base)
        k = k.repeat_interleave(q_per_group, dim=1)
        v = v.repeat_interleave(q_per_group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / d**0.5
        attention = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        x = x + attention.transpose(1, 2).reshape(b, s, -1) @ p("self_attention.linear_proj.weight").T
        h = rms_norm(x, p("pre_mlp_layernorm.weight"), eps)
        fc1 = h @ p("mlp.linear_fc1.weight").T
        if config.swiglu:
            gate, up = fc1.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(fc1)
        x = x + hidden @ p("mlp.linear_fc2.weight").T
    x = rms_norm(x, state["decoder.final_layernorm.weight"], eps)
    head = state["embedding.word_embeddings.weight" if config.tie_word_embeddings else "output_layer.weight"]
    return x @ head.T


def dense_loss_and_grads(
    config: ModelConfig, state: dict[str, torch.Tensor], tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """For microbatches `[m, b, s + 1]`: logits `[m, b, s, V]`, per-microbatch mean CE `[m]`,
    and the gradient of their mean with respect to every weight, all in float64."""
    leaves = {name: t.double().requires_grad_() for name, t in state.items()}
    logits = torch.stack([dense_logits(config, leaves, batch[:, :-1]) for batch in tokens])
    losses = F.cross_entropy(logits.flatten(0, 2), tokens[:, :, 1:].flatten(), reduction="none")
    losses = losses.view(tokens.shape[0], -1).mean(-1)
    losses.mean().backward()
    return logits.detach(), losses.detach(), {name: t.grad for name, t in leaves.items()}
