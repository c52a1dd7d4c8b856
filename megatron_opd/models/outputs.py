"""What the last pipeline stage hands to a distillation loss: final hidden states and the LM head.

Distillation losses apply the LM head themselves, chunk by chunk (`ops.fused_linear_*`),
so the model must stop before its output layer. Megatron-Core's `GPTModel.forward`
returns the decoder output (final norm applied) when `post_process` is False; the
stage keeps `post_process=True` for everything else (checkpoints, tied weights) and
turns it off only for the duration of the forward call.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megatron_opd.config.errors import ConfigError
from megatron_opd.models.tp_layout import unwrap
from megatron_opd.runtime import cpu_mode


def _check_moe_generation(gpt: torch.nn.Module) -> None:
    """Generation (KV cache) of a MoE model whose expert group reaches past its TP group.

    The allgather token dispatcher gathers each step's tokens over the TP x EP group; when
    that group holds other data-parallel ranks, their prompts, lengths and finished rows
    differ, and the gather fails (gloo) or hangs. Within TP (EP x ETP = TP) it works."""
    if getattr(gpt.config, "num_moe_experts", None) is None:
        return
    group = parallel_state.get_expert_tensor_and_model_parallel_group(check_initialized=False)
    size = torch.distributed.get_world_size(group) if group is not None else 1
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if size > tp:
        raise ConfigError(
            f"sampling from a mixture-of-experts model with parallel.expert_model_parallel_size="
            f"{parallel_state.get_expert_model_parallel_world_size()} x expert tensor-parallel "
            f"{parallel_state.get_expert_tensor_parallel_world_size()} = {size} ranks, more than "
            f"parallel.tensor_model_parallel_size={tp}, is not supported by the Megatron sampler (its data-parallel "
            "ranks decode different sequences, which the expert dispatcher cannot gather): keep the experts within "
            "TP (expert_tensor_parallel_size 1, expert_model_parallel_size <= tensor_model_parallel_size), use "
            "rollout.engine vllm, or train off-policy (lmbda 0, no seq_kd)")


def forward_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                          inference_context=None, attention_mask=None,
                          padding_mask: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
    """Run this stage; on the last stage return the final hidden states instead of logits.

    `input_ids`, `position_ids` `[b, s]`. Returns `[s, b, H]` (`[s/tp, b, H]` under
    sequence parallelism), the tensor any stage sends to the next one.
    `inference_context`: Megatron's KV cache (`StaticInferenceContext`), for generation.
    `attention_mask` `[b, 1, s, s]` (True: masked): e.g. packed sequences' block-diagonal mask;
    None is causal. `packed_seq_params`: Megatron's `PackedSeqParams`, packed rows as THD under
    Transformer Engine (`pipeline.segments`). `padding_mask` `[b, s]` (True: not counted): a mixture-of-experts model's
    routers leave those tokens out of their load-balancing statistics (`pipeline.moe_stats`).
    """
    gpt = unwrap(model)
    if inference_context is not None:
        _check_moe_generation(gpt)
    # Megatron asserts a logits gather in inference; with post_process off nothing is gathered.
    kwargs = {} if inference_context is None else {"inference_context": inference_context,
                                                   "runtime_gather_output": True}
    if padding_mask is not None:
        kwargs["padding_mask"] = padding_mask
    if packed_seq_params is not None:
        kwargs["packed_seq_params"] = packed_seq_params
    # CPU mode's device redirection costs every torch call; a dense model's forward needs none
    # (runtime.cpu_mode: MoE routers allocate with device="cuda").
    dense = getattr(gpt.config, "num_moe_experts", None) is None
    with cpu_mode.suspended() if dense else nullcontext():
        if not gpt.post_process:
            return model(input_ids, position_ids, attention_mask, **kwargs)
        gpt.post_process = False
        try:
            return model(input_ids, position_ids, attention_mask, **kwargs)
        finally:
            gpt.post_process = True


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The last stage's LM-head shard `[V/tp, H]` (the embedding when tied)."""
    gpt = unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def head_input(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`[s(/tp), b, H]` final hidden states -> `[b, s, H]`, as the LM head consumes them.

    Gathers the sequence under sequence parallelism and marks the tensor so that its
    gradient is summed over TP in the backward, exactly as Megatron's column-parallel
    output layer does with its input.
    """
    if unwrap(model).config.sequence_parallel:
        return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True,
                                                    group=parallel_state.get_tensor_model_parallel_group()
                                                    ).transpose(0, 1)
    # Transpose first: Megatron's backward all-reduce works in place on `.contiguous()` of
    # its gradient, so a non-contiguous gradient (a transpose's) would silently stay unreduced.
    return copy_to_tensor_model_parallel_region(hidden.transpose(0, 1).contiguous(),
                                                group=parallel_state.get_tensor_model_parallel_group())
