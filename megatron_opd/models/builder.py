"""Build a Megatron-Core `GPTModel` (student or teacher) from a `ModelConfig`."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend

from megatron_opd.config.compute import ComputeConfig
from megatron_opd.config.model import ModelConfig
from megatron_opd.models.layer_specs import block_spec, resolve_transformer_impl
from megatron_opd.runtime.distributed import Runtime

Role = Literal["student", "teacher"]


def _no_cuda_graph_modules() -> dict:
    """Megatron 0.16's `cuda_graph_scope` default ("full", the whole layer) warns on every
    build that it is deprecated in favour of [] (same meaning); 0.19 renamed the field
    `cuda_graph_modules`, whose default "full" warns the same, and warns when
    `cuda_graph_scope` is set at all."""
    fields = TransformerConfig.__dataclass_fields__
    for name in ("cuda_graph_modules", "cuda_graph_scope"):
        if name in fields:
            return {name: []}
    return {}


def transformer_config(
    model: ModelConfig, runtime: Runtime, dtype: torch.dtype = torch.float32, initialize: bool = True,
    compute: ComputeConfig = ComputeConfig(),
) -> TransformerConfig:
    """Megatron's config for `model` split as `runtime.parallel`, with parameters in `dtype`
    and `compute`'s attention backend and activation recomputation.

    `initialize=False` skips the random draws, for a model whose every weight is loaded
    next. (Megatron's own `perform_initialization=False` would also skip marking the
    tensor-parallel attributes of some weights, which the optimizer and grad norm need.)
    """
    parallel = runtime.parallel
    return TransformerConfig(
        **moe_fields(model, runtime, resolve_transformer_impl(compute.transformer_impl, runtime.device.type)),
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # On CPU, Megatron's CPU init draws the full master weight and splits it, so
        # weights do not depend on the TP size.
        use_cpu_initialization=runtime.is_cpu,
        # No CUDA graphs here; the field's default warns on every build (see the function).
        **_no_cuda_graph_modules(),
        attention_backend=AttnBackend[compute.attention_backend],
        **compute.megatron_fields(),
        **({} if initialize else {"init_method": _leave_uninitialized,
                                   "output_layer_init_method": _leave_uninitialized}),
    )


# Token dispatchers: in CPU mode (gloo) "allgather" (tested); "alltoall" cannot even be built
# there: Megatron-Core 0.16's MoEAlltoAllTokenDispatcher creates a `torch.cuda.Stream` in its
# constructor (RuntimeError without CUDA). On CUDA "alltoall", Megatron-LM's dispatcher for
# expert parallelism (written, not run here: no GPU).
CPU_TOKEN_DISPATCHER = "allgather"
CUDA_TOKEN_DISPATCHER = "alltoall"


def moe_fields(model: ModelConfig, runtime: Runtime, impl: str) -> dict:
    """TransformerConfig's mixture-of-experts fields for `model` ({} for a dense model).

    Routing as HF's Qwen-MoE / Mixtral: a linear router, softmax in fp32, top-k. With
    `moe_norm_topk_prob` Megatron's default order (top-k of the logits, then softmax over
    them) gives the renormalised top-k probabilities; without it `moe_router_pre_softmax`
    (softmax over all experts, then top-k) keeps the raw ones. No capacity factor: every
    token reaches its experts (no dropping), as in HF.
    """
    if not model.is_moe:
        return {}
    _define_te_general_gemm()
    cuda = runtime.device.type == "cuda"
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.expert_ffn_hidden_size,
        moe_router_pre_softmax=not model.moe_norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_z_loss_coeff=model.moe_z_loss_coeff,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=model.moe_shared_expert_gate,
        moe_layer_freq=[0 if layer in model.moe_dense_layers else 1 for layer in range(model.num_layers)],
        moe_token_dispatcher_type=CUDA_TOKEN_DISPATCHER if cuda else CPU_TOKEN_DISPATCHER,
        moe_grouped_gemm=impl == "transformer_engine",  # TEGroupedMLP; SequentialMLP in the local spec
        expert_model_parallel_size=runtime.parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=runtime.parallel.expert_tensor_size,
    )


def _define_te_general_gemm() -> None:
    """Megatron-Core 0.16's router linear tests `te_general_gemm is not None`, a name its
    `moe_utils` defines only when Transformer Engine imports: without TE every MoE forward
    raised NameError. None is what the test means by "no TE" (then torch.mm)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _leave_uninitialized(weight: torch.Tensor) -> torch.Tensor:
    return weight


def build_gpt_model(
    model: ModelConfig,
    runtime: Runtime,
    role: Role = "student",
    dtype: torch.dtype = torch.float32,
    initialize: bool = True,
    compute: ComputeConfig = ComputeConfig(),
) -> GPTModel:
    """This pipeline stage's part of the model, its weights sharded over this TP rank.

    Logits stay vocab-parallel (`[b, s, V/tp]`). A teacher comes back frozen and in
    eval mode, without activation recomputation (it never runs a backward).
    `initialize=False`: weights uninitialized, to be loaded by the caller.
    """
    if role not in ("student", "teacher"):
        raise ValueError(f"role={role!r} is invalid: one of student, teacher")
    model.check_parallel(runtime.parallel)
    if role == "teacher":
        compute = ComputeConfig(transformer_impl=compute.transformer_impl, attention_backend=compute.attention_backend)
    compute.check_layers(model.num_layers, runtime.parallel.pipeline_model_parallel_size)
    impl = resolve_transformer_impl(compute.transformer_impl, runtime.device.type)
    config = transformer_config(model, runtime, dtype, initialize, compute)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, impl),
        vocab_size=model.padded_vocab_size(runtime.parallel.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        rope_scaling=model.rope_scaling_factor is not None,
        rope_scaling_factor=model.rope_scaling_factor or 1.0,
    )
    gpt.to(runtime.device)
    if role == "teacher":
        gpt.requires_grad_(False)
        gpt.eval()
    return gpt
