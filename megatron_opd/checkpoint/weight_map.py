"""HF <-> Megatron-Core weight map for the Llama-like families (Llama, Mistral, Qwen2, Qwen3,
and the mixture-of-experts Qwen3-MoE, Qwen2-MoE, Mixtral).

Full (unsharded) tensors on both sides: TP/PP sharding is `models.tp_layout`'s job.
Megatron names are those of the local layer spec (`tp_layout` also maps Transformer
Engine's fused-norm names onto them). The four families differ only in which optional
tensors exist (QKV bias, Q/K norms, an untied LM head), which `ModelConfig` says, so
they share this one table instead of four copies of it.

Three layouts differ between the two sides:
- `qkv`: HF has separate q/k/v projections; Megatron fuses them into `linear_qkv`
  with, per key/value group, that group's query heads, then its key head, then its
  value head (`[g0: q.. k v | g1: q.. k v | ...]`), so TP splits whole groups.
- `gate_up`: HF's gate and up projections are Megatron's `linear_fc1` = `[gate; up]`.
- `vocab`: Megatron pads the embedding / LM head rows to the padded vocab size; the
  padding rows are zero on import and stripped on export.

Mixture-of-experts layers: the router is HF's `gate` (Mixtral: `block_sparse_moe.gate`);
expert e's gate/up/down projections (Mixtral: w1/w3/w2) are Megatron's
`mlp.experts.local_experts.{e}.linear_fc1` (`[gate; up]`) and `linear_fc2`, numbered
globally here (`tp_layout` maps them to the local experts of an expert-parallel rank);
Qwen2-MoE's shared expert is `mlp.shared_experts.linear_fc1/2` and its sigmoid gate
`mlp.shared_experts.gate_weight`.

Why not mbridge (PyPI, used by verl): it builds its models with Transformer Engine
only (its README: `use_te=False` is unsupported), so it cannot run on the CPU path
where every feature here is tested, and it is being folded into Megatron-Bridge, which
needs Python >= 3.12 and a heavy dependency tree. The map below is the whole of what
it would have done for these families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from megatron_opd.config.model import ModelConfig

Layout = Literal["same", "qkv", "gate_up", "vocab"]


@dataclass(frozen=True)
class WeightRule:
    """One Megatron tensor and the HF tensors it is made of."""

    megatron_name: str
    hf_names: tuple[str, ...]
    layout: Layout = "same"


def weight_rules(config: ModelConfig) -> list[WeightRule]:
    """Every tensor of the model, in HF's order (embedding, layers, final norm, head)."""
    rules = [WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for layer in range(config.num_layers):
        megatron, hf = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        attention = hf + "self_attn."
        rules.append(WeightRule(megatron + "input_layernorm.weight", (hf + "input_layernorm.weight",)))
        rules.append(WeightRule(megatron + "self_attention.linear_qkv.weight",
                                tuple(attention + f"{p}_proj.weight" for p in "qkv"), "qkv"))
        if config.add_qkv_bias:
            rules.append(WeightRule(megatron + "self_attention.linear_qkv.bias",
                                    tuple(attention + f"{p}_proj.bias" for p in "qkv"), "qkv"))
        if config.qk_layernorm:
            rules.append(WeightRule(megatron + "self_attention.q_layernorm.weight", (attention + "q_norm.weight",)))
            rules.append(WeightRule(megatron + "self_attention.k_layernorm.weight", (attention + "k_norm.weight",)))
        rules.append(WeightRule(megatron + "self_attention.linear_proj.weight", (attention + "o_proj.weight",)))
        rules.append(WeightRule(megatron + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",)))
        if config.is_moe_layer(layer):
            rules += _moe_rules(config, megatron + "mlp.", hf)
        else:
            rules += _mlp_rules(megatron + "mlp.", hf + "mlp.")
    rules.append(WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not config.tie_word_embeddings:
        rules.append(WeightRule("output_layer.weight", ("lm_head.weight",), "vocab"))
    return rules


def _mlp_rules(megatron: str, hf: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
               ) -> list[WeightRule]:
    """A SwiGLU MLP: `megatron` + linear_fc1 = [gate; up], linear_fc2 = down."""
    gate, up, down = names
    return [WeightRule(megatron + "linear_fc1.weight", (hf + f"{gate}.weight", hf + f"{up}.weight"), "gate_up"),
            WeightRule(megatron + "linear_fc2.weight", (hf + f"{down}.weight",))]


def _moe_rules(config: ModelConfig, megatron: str, hf_layer: str) -> list[WeightRule]:
    """Router, every expert (global index) and the shared expert of one MoE layer."""
    if config.moe_hf_layout == "mixtral":
        hf, expert_names = hf_layer + "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        hf, expert_names = hf_layer + "mlp.", ("gate_proj", "up_proj", "down_proj")
    rules = [WeightRule(megatron + "router.weight", (hf + "gate.weight",))]
    for expert in range(config.num_experts):
        rules += _mlp_rules(megatron + f"experts.local_experts.{expert}.", hf + f"experts.{expert}.", expert_names)
    if config.moe_shared_expert_ffn_hidden_size is not None:
        rules += _mlp_rules(megatron + "shared_experts.", hf + "shared_expert.")
        if config.moe_shared_expert_gate:
            rules.append(WeightRule(megatron + "shared_experts.gate_weight", (hf + "shared_expert_gate.weight",)))
    return rules


def _qkv_groups(config: ModelConfig) -> tuple[int, int, int]:
    """(key/value groups, query rows per group, head dim)."""
    groups, head_dim = config.query_groups, config.head_dim
    return groups, config.num_attention_heads // groups * head_dim, head_dim


def to_megatron(rule: WeightRule, hf_tensors: Sequence[torch.Tensor], config: ModelConfig,
                padded_vocab_size: int) -> torch.Tensor:
    """The full Megatron tensor of `rule` from its HF tensors (in `rule.hf_names` order)."""
    if rule.layout == "same":
        (tensor,) = hf_tensors
        return tensor
    if rule.layout == "vocab":
        (tensor,) = hf_tensors
        if tensor.shape[0] != config.vocab_size:
            raise ValueError(f"{rule.hf_names[0]} has {tensor.shape[0]} rows, the config's "
                             f"vocab_size is {config.vocab_size}")
        padding = tensor.new_zeros(padded_vocab_size - tensor.shape[0], *tensor.shape[1:])
        return torch.cat([tensor, padding])
    if rule.layout == "gate_up":
        return torch.cat(list(hf_tensors))
    groups, q_rows, head_dim = _qkv_groups(config)
    query, key, value = hf_tensors
    trailing = query.shape[1:]  # (hidden,) for weights, () for biases
    per_group = [query.reshape(groups, q_rows, *trailing), key.reshape(groups, head_dim, *trailing),
                 value.reshape(groups, head_dim, *trailing)]
    return torch.cat(per_group, dim=1).reshape(-1, *trailing)


def to_hf(rule: WeightRule, tensor: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    """The HF tensors of `rule` (in `rule.hf_names` order) from the full Megatron tensor."""
    if rule.layout == "same":
        return [tensor]
    if rule.layout == "vocab":
        return [tensor[: config.vocab_size]]
    if rule.layout == "gate_up":
        return list(tensor.chunk(2))
    groups, q_rows, head_dim = _qkv_groups(config)
    trailing = tensor.shape[1:]
    query, key, value = tensor.reshape(groups, q_rows + 2 * head_dim, *trailing).split(
        [q_rows, head_dim, head_dim], dim=1)
    return [part.reshape(-1, *trailing) for part in (query, key, value)]
