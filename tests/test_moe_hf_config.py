"""`ModelConfig` from HF configs of the mixture-of-experts families, and the refusals.

Configs are transformers' own (Qwen3MoeConfig, Qwen2MoeConfig, MixtralConfig) written by
`save_pretrained`, so the JSON layout is what real checkpoints have.
"""

from __future__ import annotations

import json

import pytest

from megatron_opd.config import ModelConfig, ParallelConfig
from megatron_opd.config.schema import ConfigError
from megatron_opd.models.hf_config import UnsupportedModelError, model_config_from_hf
from tests.moe_models import moe_family_configs


def hf_json(family: str, **fields) -> dict:
    config = moe_family_configs()[family]
    for name, value in fields.items():
        setattr(config, name, value)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return json.loads(config.to_json_string())


def test_qwen3_moe_fields():
    model = model_config_from_hf(hf_json("qwen3_moe"))
    assert (model.num_experts, model.moe_router_topk, model.moe_ffn_hidden_size, model.ffn_hidden_size) == (8, 2, 32, 96)
    assert model.moe_norm_topk_prob and model.qk_layernorm and not model.add_qkv_bias
    assert model.moe_dense_layers == [0] and model.moe_shared_expert_ffn_hidden_size is None
    assert model.moe_aux_loss_coeff == 0.01 and model.moe_hf_layout == "qwen"


def test_qwen2_moe_fields():
    model = model_config_from_hf(hf_json("qwen2_moe", decoder_sparse_step=2, mlp_only_layers=[]))
    # decoder_sparse_step=2: experts in layers 1 and 3 (HF: (i + 1) % step == 0)
    assert model.moe_dense_layers == [0, 2]
    assert model.moe_shared_expert_ffn_hidden_size == 64 and model.moe_shared_expert_gate
    assert not model.moe_norm_topk_prob and model.add_qkv_bias and model.tie_word_embeddings


def test_router_z_loss_from_config():
    assert model_config_from_hf(hf_json("qwen3_moe")).moe_z_loss_coeff is None
    config = hf_json("qwen3_moe")
    config["router_z_loss_coef"] = 0.001
    assert model_config_from_hf(config).moe_z_loss_coeff == 0.001


def test_mixtral_fields():
    model = model_config_from_hf(hf_json("mixtral"))
    assert (model.num_experts, model.moe_ffn_hidden_size, model.moe_dense_layers) == (8, 32, [])
    assert model.moe_norm_topk_prob and model.moe_hf_layout == "mixtral"


@pytest.mark.parametrize("family,field,value,words", [
    ("mixtral", "router_jitter_noise", 0.1, "router_jitter_noise=0.1"),
    ("qwen3_moe", "num_experts_per_tok", 9, "num_experts_per_tok=9"),
    ("qwen3_moe", "num_experts_per_tok", 0, "num_experts_per_tok=0"),
    ("qwen3_moe", "mlp_only_layers", [0, 1, 2, 3], "mlp_only_layers"),
    ("qwen3_moe", "mlp_only_layers", [7], "mlp_only_layers=[7]"),
    ("qwen3_moe", "shared_expert_intermediate_size", 64, "shared_expert_intermediate_size=64"),
    ("qwen3_moe", "norm_topk_prob", "yes", "norm_topk_prob='yes'"),
    ("qwen3_moe", "moe_capacity_factor", 1.25, "moe_capacity_factor=1.25"),
    ("mixtral", "router_aux_loss_coef", -1.0, "router_aux_loss_coef=-1.0"),
    ("mixtral", "router_z_loss_coef", -1.0, "router_z_loss_coef=-1.0"),
    ("qwen3_moe", "num_experts", 1, "num_experts=1.*num_local_experts=8"),
    ("qwen2_moe", "num_experts", 1, "num_experts=1 .*at least 2"),
])
def test_unsupported_moe_fields_are_refused(family, field, value, words):
    config = hf_json(family)
    config[field] = value
    with pytest.raises(UnsupportedModelError, match=words.replace("[", r"\[").replace("]", r"\]")):
        model_config_from_hf(config)


def test_dense_family_refuses_expert_fields():
    from tests.hf_models import family_configs

    config = json.loads(family_configs()["qwen3"].to_json_string())
    config["architectures"] = ["Qwen3ForCausalLM"]
    config["num_experts"] = 8
    with pytest.raises(UnsupportedModelError, match="num_experts=8"):
        model_config_from_hf(config)


def test_expert_parallel_size_must_divide_experts():
    model = model_config_from_hf(hf_json("mixtral"))
    with pytest.raises(ConfigError, match=r"parallel.expert_model_parallel_size.*3.*num_experts=8"):
        model.check_parallel(ParallelConfig(expert_model_parallel_size=3))
    model.check_parallel(ParallelConfig(expert_model_parallel_size=4))
    # a dense model ignores the expert layout: its teacher or student may have experts
    dense = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=300)
    dense.check_parallel(ParallelConfig(expert_model_parallel_size=2))


def test_expert_layout_must_divide_world():
    parallel = ParallelConfig(tensor_model_parallel_size=1, expert_model_parallel_size=4)
    with pytest.raises(ConfigError, match="expert_model_parallel_size.*a divisor of the world size 2"):
        parallel.data_parallel_size(2)
    assert ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2).data_parallel_size(4) == 2


def test_model_config_moe_checks():
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=300)
    with pytest.raises(ConfigError, match="model.moe_router_topk"):
        ModelConfig(**base, num_experts=4, moe_router_topk=5)
    with pytest.raises(ConfigError, match="model.moe_dense_layers"):
        ModelConfig(**base, num_experts=4, moe_dense_layers=[0, 1])
    with pytest.raises(ConfigError, match="model.moe_shared_expert_gate"):
        ModelConfig(**base, num_experts=4, moe_shared_expert_gate=True)
    with pytest.raises(ConfigError, match="model.moe_dense_layers"):
        ModelConfig(**base, moe_dense_layers=[0])
