"""Architecture of a decoder-only transformer (Llama / Qwen / Mistral family, and their
mixture-of-experts variants: Qwen3-MoE, Qwen2-MoE, Mixtral)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.config.schema import check

# Megatron-LM's default: the vocab is padded to a multiple of this times TP.
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128


@dataclass
class ModelConfig:
    """A pre-norm RMSNorm decoder with RoPE, grouped-query attention and a (Swi)GLU MLP.

    `vocab_size` is the number of real embedding rows (HF's `config.vocab_size`); the
    embedding is padded to `padded_vocab_size(tp)` rows so that it splits evenly across
    TP ranks. `pad_vocab_size_to` fixes that padded size instead: a teacher and a student
    of one tokenizer with different vocab sizes (Qwen2.5-7B 152064, 0.5B 151936) must
    share it so their vocab shards line up, and a checkpoint keeps the size it was saved
    with when loaded at another TP.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    num_query_groups: Optional[int] = None  # key/value heads; None means one per query head
    kv_channels: Optional[int] = None  # head dim; None means hidden_size / num_attention_heads
    max_position_embeddings: int = 4096
    norm_epsilon: float = 1e-6
    rotary_base: float = 10000.0
    # Llama 3.1 RoPE scaling by this factor (low/high frequency factors 1 and 4, original
    # context 8192: the variant Megatron-Core implements); None means plain RoPE.
    rope_scaling_factor: Optional[float] = None
    swiglu: bool = True
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    make_vocab_size_divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY
    pad_vocab_size_to: Optional[int] = None
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    # Mixture of experts (None: a dense model). Layers not in `moe_dense_layers` replace
    # their MLP with `num_experts` SwiGLU experts of `moe_ffn_hidden_size`, of which a
    # router picks `moe_router_topk` per token.
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # None: ffn_hidden_size
    # True: the top-k probabilities are renormalised to sum to 1 (softmax over the top-k
    # logits; Mixtral, Qwen3-30B-A3B); False: the full softmax's top-k values (Qwen2-MoE).
    moe_norm_topk_prob: bool = True
    # One shared expert that every token goes through (Qwen2-MoE); None: none.
    moe_shared_expert_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_gate: bool = False  # the shared expert's output times sigmoid(w . x)
    moe_dense_layers: list[int] = dataclasses.field(default_factory=list)  # 0-based layers with a dense MLP
    # Load-balancing (switch) loss coefficient, added to the student's loss; 0: off.
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: Optional[float] = None  # router z-loss coefficient (ST-MoE); None: off
    # How the HF checkpoint names the expert tensors: "qwen" (mlp.gate, mlp.experts.{e}.
    # gate_proj/up_proj/down_proj) or "mixtral" (block_sparse_moe.gate, ...experts.{e}.w1/w3/w2).
    moe_hf_layout: Literal["qwen", "mixtral"] = "qwen"

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "vocab_size", "max_position_embeddings", "make_vocab_size_divisible_by"):
            check(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "an integer >= 1")
        if self.kv_channels is None:
            check(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
                  self.hidden_size,
                  f"a multiple of num_attention_heads={self.num_attention_heads} (or set kv_channels)")
        else:
            check(self.kv_channels >= 1, "model.kv_channels", self.kv_channels, "an integer >= 1")
        groups = self.query_groups
        check(groups >= 1 and self.num_attention_heads % groups == 0, "model.num_query_groups",
              self.num_query_groups, f"a divisor of num_attention_heads={self.num_attention_heads}")
        check(self.norm_epsilon > 0, "model.norm_epsilon", self.norm_epsilon, "a number > 0")
        check(self.rotary_base > 0, "model.rotary_base", self.rotary_base, "a number > 0")
        if self.rope_scaling_factor is not None:
            check(self.rope_scaling_factor > 0, "model.rope_scaling_factor",
                  self.rope_scaling_factor, "a number > 0, or null for plain RoPE")
        if self.pad_vocab_size_to is not None:
            check(self.pad_vocab_size_to >= self.vocab_size, "model.pad_vocab_size_to",
                  self.pad_vocab_size_to, f"an integer >= vocab_size={self.vocab_size}")
        for name in ("hidden_dropout", "attention_dropout"):
            check(0.0 <= getattr(self, name) < 1.0, f"model.{name}", getattr(self, name), "in [0, 1)")
        check(self.init_method_std > 0, "model.init_method_std", self.init_method_std, "a number > 0")
        self._check_moe()

    def _check_moe(self) -> None:
        if self.num_experts is None:
            for name in ("moe_ffn_hidden_size", "moe_shared_expert_ffn_hidden_size", "moe_z_loss_coeff"):
                check(getattr(self, name) is None, f"model.{name}", getattr(self, name),
                      "null for a dense model (num_experts null)")
            check(not self.moe_dense_layers, "model.moe_dense_layers", self.moe_dense_layers,
                  "empty for a dense model (num_experts null)")
            check(not self.moe_shared_expert_gate, "model.moe_shared_expert_gate", self.moe_shared_expert_gate,
                  "false for a dense model (num_experts null)")
            return
        check(self.num_experts >= 2, "model.num_experts", self.num_experts, "an integer >= 2, or null")
        check(1 <= self.moe_router_topk <= self.num_experts, "model.moe_router_topk", self.moe_router_topk,
              f"an integer in [1, num_experts={self.num_experts}]")
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_ffn_hidden_size"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"model.{name}", value, "an integer >= 1, or null")
        check(not self.moe_shared_expert_gate or self.moe_shared_expert_ffn_hidden_size is not None,
              "model.moe_shared_expert_gate", self.moe_shared_expert_gate,
              "true only with moe_shared_expert_ffn_hidden_size set")
        check(all(0 <= layer < self.num_layers for layer in self.moe_dense_layers)
              and len(set(self.moe_dense_layers)) == len(self.moe_dense_layers)
              and len(self.moe_dense_layers) < self.num_layers,
              "model.moe_dense_layers", self.moe_dense_layers,
              f"distinct layer indices in [0, num_layers={self.num_layers}), at least one layer left MoE")
        check(self.moe_aux_loss_coeff >= 0, "model.moe_aux_loss_coeff", self.moe_aux_loss_coeff, "a number >= 0")
        check(self.moe_z_loss_coeff is None or self.moe_z_loss_coeff > 0, "model.moe_z_loss_coeff",
              self.moe_z_loss_coeff, "a number > 0, or null")

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def is_moe_layer(self, layer: int) -> bool:
        """Whether 0-based `layer` has experts (else a dense MLP of ffn_hidden_size)."""
        return self.is_moe and layer not in self.moe_dense_layers

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        """`pad_vocab_size_to` when set, else the vocab rounded up to a multiple of
        `make_vocab_size_divisible_by * tp`, as Megatron-LM does."""
        if self.pad_vocab_size_to is not None:
            check(self.pad_vocab_size_to % tensor_model_parallel_size == 0,
                  "model.pad_vocab_size_to", self.pad_vocab_size_to,
                  f"a multiple of parallel.tensor_model_parallel_size={tensor_model_parallel_size}")
            return self.pad_vocab_size_to
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, parallel: ParallelConfig) -> None:
        """Raise when this architecture cannot be split as `parallel` asks."""
        tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        for name, value in (("num_attention_heads", self.num_attention_heads),
                            ("num_query_groups", self.query_groups),
                            ("ffn_hidden_size", self.ffn_hidden_size)):
            check(value % tp == 0, f"model.{name}", value,
                  f"a multiple of parallel.tensor_model_parallel_size={tp}")
        check(self.num_layers % pp == 0, "model.num_layers", self.num_layers,
              f"a multiple of parallel.pipeline_model_parallel_size={pp}")
        ep, etp = parallel.expert_model_parallel_size, parallel.expert_tensor_size
        if not self.is_moe:
            return  # a dense model ignores the expert layout (its teacher or student may have experts)
        check(self.num_experts % ep == 0, "parallel.expert_model_parallel_size", ep,
              f"a divisor of model.num_experts={self.num_experts}")
        check(self.expert_ffn_hidden_size % etp == 0, "model.moe_ffn_hidden_size", self.expert_ffn_hidden_size,
              f"a multiple of the expert tensor-parallel size {etp}")
        if self.moe_shared_expert_ffn_hidden_size is not None:
            check(self.moe_shared_expert_ffn_hidden_size % tp == 0, "model.moe_shared_expert_ffn_hidden_size",
                  self.moe_shared_expert_ffn_hidden_size,
                  f"a multiple of parallel.tensor_model_parallel_size={tp}")


def with_common_padded_vocab(
    configs: Sequence[ModelConfig], tensor_model_parallel_size: int
) -> list[ModelConfig]:
    """The configs with one padded vocab size, the largest any of them needs at this TP.

    Every padded size is a multiple of `make_vocab_size_divisible_by * tp`, hence of tp,
    so the largest is a valid padding for all of them.
    """
    padded = max(config.padded_vocab_size(tensor_model_parallel_size) for config in configs)
    return [dataclasses.replace(config, pad_vocab_size_to=padded) for config in configs]
