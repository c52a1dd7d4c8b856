"""Layer specs: Transformer Engine on GPU, Megatron's local modules on CPU."""

from __future__ import annotations

import dataclasses
from typing import Union

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


def local_block_spec(config: TransformerConfig) -> TransformerBlockSubmodules:
    """Megatron's local layer spec with every norm (input, pre-MLP, Q/K, final) as our RMSNorm
    and its core attention through torch's fused kernel where that is exact (`SDPAttention`)."""
    layer = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
    attention = layer.submodules.self_attention
    qk_norm = RMSNorm if config.qk_layernorm else attention.submodules.q_layernorm
    attention = dataclasses.replace(
        attention,
        submodules=dataclasses.replace(
            attention.submodules, q_layernorm=qk_norm, k_layernorm=qk_norm, core_attention=SDPAttention
        ),
    )
    layer = dataclasses.replace(
        layer,
        submodules=dataclasses.replace(
            layer.submodules,
            input_layernorm=RMSNorm,
            pre_mlp_layernorm=RMSNorm,
            self_attention=attention,
        ),
    )
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=RMSNorm
    )


def block_spec(config: TransformerConfig, impl: str) -> Union[ModuleSpec, TransformerBlockSubmodules]:
    """The decoder spec for `impl` ('transformer_engine' or 'local', already resolved)."""
    if impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    return local_block_spec(config)
