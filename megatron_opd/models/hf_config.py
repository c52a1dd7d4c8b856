"""`ModelConfig` from a Hugging Face `config.json`, for the dense Llama-like families.

Supported: Llama (2, 3, 3.1/3.2 with llama3 RoPE scaling), Mistral, Qwen2 / Qwen2.5
(QKV bias) and Qwen3 (QK-norm). They share one decoder (pre-norm RMSNorm, RoPE with
rotate-half, GQA, SwiGLU), so one `ModelConfig` describes each and one weight map
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


FAMILIES = {
    family.model_type: family
    for family in (
        Family("llama", "LlamaForCausalLM", qkv_bias=False, qk_norm=False),
        Family("mistral", "MistralForCausalLM", qkv_bias=False, qk_norm=False),
        Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, qk_norm=False),
        Family("qwen3", "Qwen3ForCausalLM", qkv_bias=False, qk_norm=True),
    )
}

# Megatron-Core's llama3 RoPE scaling takes only the factor; these are fixed there.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
# Keys that mean a feature we do not build, when set to anything but a neutral value.
_SUSPICIOUS_WORDS = ("expert", "moe", "router", "softcap", "window", "sliding", "rope", "rotary")
# Keys handled explicitly below, so the scan for suspicious words skips them.
_HANDLED = {"rope_theta", "rope_scaling", "rope_parameters", "sliding_window", "use_sliding_window",
            "max_window_layers", "layer_types", "partial_rotary_factor"}


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
    if family.model_type in ("qwen2", "qwen3"):
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


def _scan_unhandled(hf_config: Mapping[str, Any]) -> None:
    for key, value in hf_config.items():
        if key in _HANDLED or not value or not any(word in key.lower() for word in _SUSPICIOUS_WORDS):
            continue
        _refuse(key, value, "this feature is not built (a field that changes the math is never ignored)")


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
    _scan_unhandled(hf_config)
    rotary_base, rope_scaling_factor = _rope(hf_config)

    def required(field: str) -> Any:
        if field not in hf_config:
            raise ConfigError(f"HF config lacks {field!r}, which {family.architecture} needs")
        return hf_config[field]

    heads = required("num_attention_heads")
    hidden = required("hidden_size")
    return ModelConfig(
        num_layers=required("num_hidden_layers"),
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
        add_qkv_bias=family.qkv_bias,
        qk_layernorm=family.qk_norm,
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        pad_vocab_size_to=pad_vocab_size_to,
        attention_dropout=float(hf_config.get("attention_dropout", 0.0)),
        init_method_std=float(hf_config.get("initializer_range", 0.02)),
    )
