"""Layer specs: Transformer Engine on GPU, Megatron's local modules on CPU.

A mixture-of-experts model gets one spec per layer: Megatron's MoE layer (router,
token dispatcher, experts, optional shared expert) where the model has experts, the
dense MLP in `moe_dense_layers`. Experts are Megatron's `SequentialMLP` (one MLP per
local expert) in the local spec, grouped GEMM (`TEGroupedMLP`) under Transformer Engine.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_opd.config.compute import TransformerImpl
from megatron_opd.models.norms import RMSNorm
from megatron_opd.models.sdpa_attention import SDPAttention


def has_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_transformer_impl(requested: TransformerImpl, device_type: str) -> str:
    """'auto' is Transformer Engine on CUDA and the local spec on CPU; no silent fallback."""
    if requested == "auto":
        requested = "transformer_engine" if device_type == "cuda" else "local"
    if requested == "transformer_engine":
        if device_type != "cuda":
            raise ValueError("compute.transformer_impl='transformer_engine' needs a CUDA device; use 'local' on CPU")
        if not has_transformer_engine():
            raise ImportError(
                "compute.transformer_impl='transformer_engine' (auto on CUDA) but transformer_engine is not "
                "installed: `pip install -e .[gpu]`, or set compute.transformer_impl: local"
            )
    elif requested != "local":
        raise ValueError(f"compute.transformer_impl={requested!r} is invalid: one of auto, transformer_engine, local")
    return requested


def moe_layer_pattern(config: TransformerConfig) -> Optional[list[bool]]:
    """Per global layer, whether it has experts; None for a dense model."""
    if config.num_moe_experts is None:
        return None
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [layer % freq == 0 for layer in range(config.num_layers)]
    return [bool(flag) for flag in freq]


def _this_stage(config: TransformerConfig, specs: Sequence[ModuleSpec]) -> list[ModuleSpec]:
    offset = get_transformer_layer_offset(config)
    return list(specs[offset: offset + get_num_layers_to_build(config)])


def _local_layer_spec(config: TransformerConfig, num_experts: Optional[int]) -> ModuleSpec:
    """Megatron's local layer spec with every norm (input, pre-MLP, Q/K) as our RMSNorm and
    its core attention through torch's fused kernel where that is exact (`SDPAttention`)."""
    layer = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                     qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
    attention = layer.submodules.self_attention
    qk_norm = RMSNorm if config.qk_layernorm else attention.submodules.q_layernorm
    attention = dataclasses.replace(
        attention,
        submodules=dataclasses.replace(
            attention.submodules, q_layernorm=qk_norm, k_layernorm=qk_norm, core_attention=SDPAttention
        ),
    )
    return dataclasses.replace(
        layer,
        submodules=dataclasses.replace(
            layer.submodules,
            input_layernorm=RMSNorm,
            pre_mlp_layernorm=RMSNorm,
            self_attention=attention,
        ),
    )


def local_block_spec(config: TransformerConfig) -> TransformerBlockSubmodules:
    """This stage's layers in the local spec (see `_local_layer_spec`), final norm our RMSNorm."""
    pattern = moe_layer_pattern(config)
    if pattern is None:
        layers = [_local_layer_spec(config, None)] * get_num_layers_to_build(config)
    else:
        dense, moe = _local_layer_spec(config, None), _local_layer_spec(config, config.num_moe_experts)
        layers = _this_stage(config, [moe if has_experts else dense for has_experts in pattern])
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=RMSNorm)


def te_block_spec(config: TransformerConfig) -> Union[ModuleSpec, TransformerBlockSubmodules]:
    """Transformer Engine's spec; MoE layers with grouped GEMM experts (`config.moe_grouped_gemm`).
    Written against Megatron-Core 0.16's documented API; runs only on CUDA (not tested here)."""
    pattern = moe_layer_pattern(config)
    if pattern is None:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    from megatron.core.extensions.transformer_engine import TENorm

    dense = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    moe = get_gpt_layer_with_transformer_engine_spec(num_experts=config.num_moe_experts,
                                                     moe_grouped_gemm=config.moe_grouped_gemm,
                                                     qk_layernorm=config.qk_layernorm)
    layers = _this_stage(config, [moe if has_experts else dense for has_experts in pattern])
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=TENorm)


def block_spec(config: TransformerConfig, impl: str) -> Union[ModuleSpec, TransformerBlockSubmodules]:
    """The decoder spec for `impl` ('transformer_engine' or 'local', already resolved)."""
    if impl == "transformer_engine":
        return te_block_spec(config)
    return local_block_spec(config)
