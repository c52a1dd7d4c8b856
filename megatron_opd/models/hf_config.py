"""`ModelConfig` from a Hugging Face `config.json`, for the Llama-like families.

Supported: Llama (2, 3, 3.1/3.2 with llama3 RoPE scaling), Mistral, Qwen2 / Qwen2.5
(QKV bias) and Qwen3 (QK-norm), and the mixture-of-experts Qwen3-MoE (QK-norm),
Qwen2-MoE (QKV bias, a shared expert with its sigmoid gate) and Mixtral. They share one
decoder (pre-norm RMSNorm, RoPE with rotate-half, GQA, SwiGLU MLPs or SwiGLU experts
behind a softmax top-k router), so one `ModelConfig` describes each and one weight map
(`megatron_opd.checkpoint.weight_map`) converts them.

Any field that would make the HF model compute something our Megatron model does not
(sliding-window attention, an unsupported RoPE scaling, biases, another activation,
experts, soft-capping) is refused here with its name, never ignored. The raw JSON is
read rather than `transformers.AutoConfig`, so both the transformers 4 layout
(`rope_theta`, `rope_scaling`) and the 5 layout (`rope_parameters`) are understood
and an architecture transformers does not know still gets our error, not its.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from megatron_opd.config.model import MAKE_VOCAB_SIZE_DIVISIBLE_BY, ModelConfig
from megatron_opd.config.schema import ConfigError


class UnsupportedModelError(ConfigError):
    """The HF model is of an architecture, or uses a feature, that we cannot reproduce exactly."""


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    qkv_bias: bool  # q/k/v projections always carry a bias (Qwen2), no config field
    qk_norm: bool  # RMSNorm on each query and key head (Qwen3)
    moe: bool = False  # experts (router + SwiGLU experts) in place of some MLPs


FAMILIES = {
    family.model_type: family
    for family in (
        Family("llama", "LlamaForCausalLM", qkv_bias=False, qk_norm=False),
        Family("mistral", "MistralForCausalLM", qkv_bias=False, qk_norm=False),
        Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, qk_norm=False),
        Family("qwen3", "Qwen3ForCausalLM", qkv_bias=False, qk_norm=True),
        Family("qwen3_moe", "Qwen3MoeForCausalLM", qkv_bias=False, qk_norm=True, moe=True),
        Family("qwen2_moe", "Qwen2MoeForCausalLM", qkv_bias=True, qk_norm=False, moe=True),
        Family("mixtral", "MixtralForCausalLM", qkv_bias=False, qk_norm=False, moe=True),
    )
}

# Megatron-Core's llama3 RoPE scaling takes only the factor; these are fixed there.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
# Keys that mean a feature we do not build, when set to anything but a neutral value.
_SUSPICIOUS_WORDS = ("expert", "moe", "router", "softcap", "window", "sliding", "rope", "rotary", "capacity",
                     "sparse", "mlp_only", "topk", "drop_token", "token_drop")
# Keys handled explicitly below, so the scan for suspicious words skips them.
_HANDLED = {"rope_theta", "rope_scaling", "rope_parameters", "sliding_window", "use_sliding_window",
            "max_window_layers", "layer_types", "partial_rotary_factor"}
# Mixture-of-experts keys `_moe_fields` reads (each checked there); for a dense family they
# stay suspicious and are refused.
_MOE_HANDLED = {"num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                "norm_topk_prob", "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
                "router_aux_loss_coef", "output_router_logits", "router_jitter_noise", "qkv_bias",
                "router_z_loss_coef"}


def read_hf_config(path: Union[str, Path]) -> dict[str, Any]:
    """The parsed `config.json` of an HF model directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no HF config at {file}: expected an HF model directory with config.json")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ConfigError(f"{file} must hold a JSON object of config fields, not {type(config).__name__}")
    return config


def hf_family(hf_config: Mapping[str, Any]) -> Family:
    """The supported family of this config, or an `UnsupportedModelError` naming it."""
    model_type = hf_config.get("model_type")
    supported = ", ".join(f"{f.architecture} (model_type {f.model_type})" for f in FAMILIES.values())
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"HF config model_type={model_type!r} (architectures={hf_config.get('architectures')}) "
            f"is not supported: one of {supported}")
    family = FAMILIES[model_type]
    architectures = hf_config.get("architectures") or [family.architecture]
    if list(architectures) != [family.architecture]:
        raise UnsupportedModelError(
            f"HF config architectures={architectures} is not supported for model_type "
            f"{model_type!r}: only [{family.architecture!r}]")
    return family


def _refuse(field: str, value: Any, why: str) -> None:
    raise UnsupportedModelError(f"HF config {field}={value!r} is not supported: {why}")


def _rope(hf_config: Mapping[str, Any]) -> tuple[float, Optional[float]]:
    """(rotary_base, llama3 scaling factor or None), from either transformers layout."""
    parameters = dict(hf_config.get("rope_parameters") or {})
    if "rope_theta" in hf_config:
        parameters.setdefault("rope_theta", hf_config["rope_theta"])
    for key, value in (hf_config.get("rope_scaling") or {}).items():
        parameters.setdefault(key, value)
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    theta = float(parameters.get("rope_theta", 10000.0))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        _refuse("rope_type", rope_type, "only 'default' and 'llama3' RoPE are built")
    for key, expected in _LLAMA3_FIXED.items():
        if float(parameters.get(key, expected)) != expected:
            _refuse(f"rope_parameters.{key}", parameters[key],
                    f"Megatron-Core's llama3 RoPE scaling fixes it at {expected}")
    if "factor" not in parameters:
        raise ConfigError("HF config rope_parameters.factor is missing: llama3 RoPE scaling needs it")
    return theta, float(parameters["factor"])


def _check_attention_window(family: Family, hf_config: Mapping[str, Any]) -> None:
    layer_types = hf_config.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        _refuse("layer_types", sorted(set(layer_types)), "only 'full_attention' layers are built")
    window = hf_config.get("sliding_window")
    if family.model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        # Qwen windows only the layers from max_window_layers on, and only when asked to.
        first_windowed = hf_config.get("max_window_layers") or 0
        uses_window = (hf_config.get("use_sliding_window", False)
                       and first_windowed < hf_config.get("num_hidden_layers", 0))
    else:
        uses_window = True
    if uses_window and window is not None:
        _refuse("sliding_window", window,
                "sliding-window attention is not built; the model would differ from HF on "
                f"sequences longer than {window} tokens")


def _scan_unhandled(family: Family, hf_config: Mapping[str, Any]) -> None:
    handled = _HANDLED | (_MOE_HANDLED if family.moe else set())
    for key, value in hf_config.items():
        if key in handled or not value or not any(word in key.lower() for word in _SUSPICIOUS_WORDS):
            continue
        _refuse(key, value, "this feature is not built (a field that changes the math is never ignored)")


def _positive_int(field: str, value: Any) -> int:
    if value is None:
        raise ConfigError(f"HF config lacks {field!r}, which a mixture-of-experts model needs")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _refuse(field, value, "a positive integer is needed")
    return value


def _moe_fields(family: Family, hf_config: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """ModelConfig's expert fields, each HF field checked; {} for a dense family.

    Qwen-MoE puts experts in layer i unless i is in `mlp_only_layers` or (i+1) is not a
    multiple of `decoder_sparse_step`; Mixtral in every layer, its experts of
    `intermediate_size`, the top-k probabilities always renormalised.
    """
    if not family.moe:
        return {}
    key = "num_experts" if "num_experts" in hf_config else "num_local_experts"
    if "num_local_experts" in hf_config and hf_config.get("num_experts", hf_config["num_local_experts"]) != \
            hf_config["num_local_experts"]:
        _refuse("num_experts", hf_config["num_experts"],
                f"one expert count: num_local_experts={hf_config['num_local_experts']} says otherwise")
    num_experts = _positive_int(key, hf_config.get(key))
    if num_experts < 2:
        _refuse(key, num_experts, "a mixture of at least 2 experts is needed")
    topk = _positive_int("num_experts_per_tok", hf_config.get("num_experts_per_tok"))
    if topk > num_experts:
        _refuse("num_experts_per_tok", topk, f"at most {key}={num_experts}")
    if float(hf_config.get("router_jitter_noise") or 0.0) != 0.0:
        _refuse("router_jitter_noise", hf_config["router_jitter_noise"], "only 0.0 (no router input jitter) is built")
    aux = float(hf_config.get("router_aux_loss_coef") or 0.0)
    if aux < 0:
        _refuse("router_aux_loss_coef", aux, "a number >= 0")
    # The router z-loss (ST-MoE) is a training choice these families' configs do not name;
    # `router_z_loss_coef` (OLMoE's and Switch's key) in config.json turns it on.
    z_loss = float(hf_config.get("router_z_loss_coef") or 0.0)
    if z_loss < 0:
        _refuse("router_z_loss_coef", z_loss, "a number >= 0")
    losses = dict(moe_aux_loss_coeff=aux, moe_z_loss_coeff=z_loss or None)
    if family.model_type == "mixtral":
        return dict(num_experts=num_experts, moe_router_topk=topk, moe_norm_topk_prob=True,
                    moe_ffn_hidden_size=_positive_int("intermediate_size", hf_config.get("intermediate_size")),
                    moe_hf_layout="mixtral", **losses)
    norm = hf_config.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        _refuse("norm_topk_prob", norm, "true or false")
    step = _positive_int("decoder_sparse_step", hf_config.get("decoder_sparse_step", 1))
    dense_only = hf_config.get("mlp_only_layers") or []
    if not isinstance(dense_only, list) or not all(isinstance(i, int) and 0 <= i < num_layers for i in dense_only):
        _refuse("mlp_only_layers", dense_only, f"a list of layer indices in [0, num_hidden_layers={num_layers})")
    dense = [i for i in range(num_layers) if i in dense_only or (i + 1) % step != 0]
    if len(dense) == num_layers:
        _refuse("mlp_only_layers", dense_only, f"with decoder_sparse_step={step} no layer has experts: "
                "use the dense family's config for a dense model")
    fields = dict(num_experts=num_experts, moe_router_topk=topk, moe_norm_topk_prob=norm,
                  moe_ffn_hidden_size=_positive_int("moe_intermediate_size", hf_config.get("moe_intermediate_size")),
                  moe_dense_layers=dense, **losses)
    shared = hf_config.get("shared_expert_intermediate_size")
    if family.model_type == "qwen2_moe":
        # Qwen2-MoE always builds the shared expert and its gate.
        fields.update(moe_shared_expert_ffn_hidden_size=_positive_int("shared_expert_intermediate_size", shared),
                      moe_shared_expert_gate=True)
    elif shared:
        _refuse("shared_expert_intermediate_size", shared, f"{family.architecture} has no shared expert")
    return fields


def model_config_from_hf(
    hf_config: Union[Mapping[str, Any], str, Path],
    *,
    make_vocab_size_divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY,
    pad_vocab_size_to: Optional[int] = None,
) -> ModelConfig:
    """The `ModelConfig` that computes exactly what the HF model computes.

    `hf_config` is the parsed config.json, or the model directory.
    """
    if not isinstance(hf_config, Mapping):
        hf_config = read_hf_config(hf_config)
    family = hf_family(hf_config)
    activation = hf_config.get("hidden_act", "silu")
    if activation not in ("silu", "swish"):  # one function under two names in transformers
        _refuse("hidden_act", activation, "only 'silu' (SwiGLU) is built")
    for field in ("attention_bias", "mlp_bias"):
        if hf_config.get(field):
            _refuse(field, hf_config[field], f"{family.architecture} is built without it")
    if float(hf_config.get("partial_rotary_factor") or 1.0) != 1.0:
        _refuse("partial_rotary_factor", hf_config["partial_rotary_factor"], "only 1.0 is built")
    _check_attention_window(family, hf_config)
    _scan_unhandled(family, hf_config)
    rotary_base, rope_scaling_factor = _rope(hf_config)

    def required(field: str) -> Any:
        if field not in hf_config:
            raise ConfigError(f"HF config lacks {field!r}, which {family.architecture} needs")
        return hf_config[field]

    heads = required("num_attention_heads")
    hidden = required("hidden_size")
    num_layers = required("num_hidden_layers")
    qkv_bias = family.qkv_bias
    if family.model_type == "qwen2_moe":  # transformers 5 made Qwen2-MoE's QKV bias a field
        qkv_bias = bool(hf_config.get("qkv_bias", True))
    return ModelConfig(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        kv_channels=hf_config.get("head_dim") or hidden // heads,
        ffn_hidden_size=required("intermediate_size"),
        vocab_size=required("vocab_size"),
        max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
        norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
        rotary_base=rotary_base,
        rope_scaling_factor=rope_scaling_factor,
        swiglu=True,
        add_qkv_bias=qkv_bias,
        qk_layernorm=family.qk_norm,
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        pad_vocab_size_to=pad_vocab_size_to,
        attention_dropout=float(hf_config.get("attention_dropout", 0.0)),
        init_method_std=float(hf_config.get("initializer_range", 0.02)),
        **_moe_fields(family, hf_config, num_layers),
    )
