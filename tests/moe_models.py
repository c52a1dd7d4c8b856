"""Tiny random mixture-of-experts HF models (Qwen3-MoE, Qwen2-MoE, Mixtral), written to disk.

Real-model ratios at toy sizes: 8 experts, top-2 routing, experts narrower than the
dense MLP, a dense layer among the MoE layers (Qwen `mlp_only_layers`), Qwen2-MoE's shared
expert with its sigmoid gate, Qwen3-MoE's renormalised top-k (`norm_topk_prob`), Qwen2-MoE's
raw top-k. Weights are redrawn by `tests.hf_models.randomize` (activations O(1)).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.hf_models import VOCAB, write_random_model

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-6, num_experts_per_tok=2, router_aux_loss_coef=0.01)


def moe_family_configs() -> dict:
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    return {
        "qwen3_moe": Qwen3MoeConfig(**_COMMON, head_dim=32, intermediate_size=96, moe_intermediate_size=32,
                                    num_experts=8, norm_topk_prob=True, mlp_only_layers=[0],
                                    rope_theta=1000000.0),
        "qwen2_moe": Qwen2MoeConfig(**_COMMON, intermediate_size=96, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=64, num_experts=8, norm_topk_prob=False,
                                    mlp_only_layers=[2], rope_theta=1000000.0, tie_word_embeddings=True),
        "mixtral": MixtralConfig(**_COMMON, intermediate_size=32, num_local_experts=8, sliding_window=None,
                                 rope_theta=1000000.0),
    }


def make_moe_hf_model(family: str, directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                      **config_fields) -> Path:
    """Write a random `family` MoE model to `directory`; `config_fields` override its config."""
    write_random_model(moe_family_configs()[family], directory, seed, dtype, **config_fields)
    return Path(directory)
