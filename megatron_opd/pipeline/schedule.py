"""Microbatches through Megatron-Core's forward-backward schedule, ending at the final hidden states.

Every model here (student, teacher) runs through `get_forward_backward_func`, so
pipeline parallelism, its p2p communication and the interleaving of forward and
backward are Megatron's own. The last stage stops before the LM head
(`models.outputs.forward_hidden_states`) and hands the hidden states to a loss.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from megatron_opd.config.errors import ConfigError
from megatron_opd.models.outputs import forward_hidden_states
from megatron_opd.pipeline.microbatch import Microbatch
from megatron_opd.pipeline.moe_stats import RouterStats, is_moe, sync_router_normalization
from megatron_opd.pipeline.segments import packed_inputs, packed_positions, thd_packed_seq_params


def _same_shapes_across_experts(microbatches: list[Microbatch], device: torch.device) -> list[Microbatch]:
    """The microbatches padded at the end (token 0, not counted) to the longest sequence of the
    expert group (the ranks whose tokens the MoE layers gather: TP x EP), which may hold other
    data-parallel ranks' rows of other lengths. Padding after a sequence does not change a
    causal model's outputs on it. Collective over the expert group."""
    group = parallel_state.get_expert_tensor_and_model_parallel_group(check_initialized=False)
    if group is None or torch.distributed.get_world_size(group) == 1:
        return microbatches
    rows = {batch.tokens.shape[0] for batch in microbatches}
    local = torch.tensor([len(microbatches), max(b.tokens.shape[1] for b in microbatches), max(rows), -min(rows)],
                         dtype=torch.long, device=device)
    largest = local.clone()
    torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX, group=group)
    count, length, most_rows, fewest_rows = largest.tolist()
    if count != len(microbatches) or most_rows != -fewest_rows or len(rows) != 1:
        raise ValueError(
            f"a mixture-of-experts model split over {torch.distributed.get_world_size(group)} expert ranks needs "
            f"every rank of the expert group to run as many microbatches of as many rows (this rank: "
            f"{len(microbatches)} of {sorted(rows)} rows, the group's largest: {count} of {most_rows}): use fixed "
            "rows (training.max_tokens_per_microbatch null) or parallel.expert_model_parallel_size 1")
    padded = []
    for batch in microbatches:
        extra = length - batch.tokens.shape[1]
        if extra == 0:
            padded.append(batch)
            continue
        pad = torch.nn.functional.pad
        segments = pad(batch.segments, (0, extra)) if batch.segments is not None else None
        padded.append(Microbatch(pad(batch.tokens, (0, extra)), pad(batch.loss_mask, (0, extra)), batch.rows,
                                 segments, batch.spans))
    return padded


def uses_transformer_engine(model: torch.nn.Module) -> bool:
    """Whether `model`'s layers are Transformer Engine's (the GPU spec), whose attention takes
    packed rows as THD with `PackedSeqParams` rather than as a mask."""
    return any(type(module).__module__.startswith("megatron.core.extensions.transformer_engine")
               for module in model.modules())


# loss(index of the microbatch, the microbatch, last-stage hidden states [s(/tp), b, H])
LossFunction = Callable[[int, Microbatch, torch.Tensor], tuple]


def run_microbatches(model: torch.nn.Module, microbatches: list[Microbatch], loss: LossFunction,
                     forward_only: bool) -> Optional[list]:
    """Forward (and backward unless `forward_only`) every microbatch.

    `loss` runs on the last stage and returns what Megatron's schedule takes from a loss
    function: `(loss, num_tokens, metrics)` with per-token normalization
    (`config.calculate_per_token_loss`), or `(loss, metrics)`. Returns the metrics of
    every microbatch on the last stage, None on other stages.

    Microbatches may differ in shape `[b, s + 1]` (token-budget batching): without pipeline
    parallelism Megatron's schedule takes each as it comes; with it the stages exchange each
    activation's shape before the activation (`variable_seq_lengths`, switched on for the call).
    Packed microbatches (`segments`) run with each example's own positions and a block-diagonal
    causal mask (local spec), or as THD with `PackedSeqParams` under Transformer Engine
    (UNTESTED: no Transformer Engine on CPU).

    Mixture-of-experts models: the routers get `~loss_mask` as padding mask (the
    load-balancing loss over counted tokens, normalised like the loss: `pipeline.moe_stats`)
    and, with a backward, the last microbatch's metrics get the router statistics
    (`moe_aux_loss_sum`, `moe_expert_tokens_max`, `moe_expert_load_max`).
    """
    if not microbatches:
        raise ValueError("run_microbatches needs at least one microbatch")
    device = next(model.parameters()).device
    config = get_model_config(model)
    moe = is_moe(model)
    if moe and not forward_only and config.tensor_model_parallel_size > 1 and not config.sequence_parallel:
        # Megatron's MoE layer refuses this itself, mid-forward, with a message about speed.
        raise ConfigError(f"parallel.sequence_parallel=False is invalid for training a mixture-of-experts model at "
                          f"parallel.tensor_model_parallel_size={config.tensor_model_parallel_size}: Megatron's MoE "
                          "layers train with TP only under sequence parallelism; set parallel.sequence_parallel true")
    if moe:
        sync_router_normalization(model)
        microbatches = _same_shapes_across_experts(microbatches, device)
    shapes = {tuple(batch.tokens.shape) for batch in microbatches}
    micro_batch_size, seq_plus_one = max(shapes)
    thd = any(batch.segments is not None for batch in microbatches) and uses_transformer_engine(model)

    def forward_step(iterator, model):
        index, batch = next(iterator)
        batch = batch.to(device)
        b, s = batch.input_ids.shape
        position_ids, attention_mask = torch.arange(s, device=device).expand(b, s), None
        packed_seq_params = None
        if batch.segments is not None and thd:  # Transformer Engine takes the examples' boundaries, no mask
            position_ids, packed_seq_params = packed_positions(batch.segments), thd_packed_seq_params(batch.segments)
        elif batch.segments is not None:  # several examples per row: their own positions and causal masks
            position_ids, attention_mask = packed_inputs(batch.segments)
        padding_mask = ~batch.loss_mask if moe else None
        hidden = forward_hidden_states(model, batch.input_ids, position_ids, attention_mask=attention_mask,
                                       padding_mask=padding_mask, packed_seq_params=packed_seq_params)
        return hidden, lambda output: loss(index, batch, output)

    variable = config.variable_seq_lengths
    # One shape: the receiving stage allocates [s(/tp), b, H] from seq_length and micro_batch_size.
    config.variable_seq_lengths = variable or len(shapes) > 1
    stats = RouterStats(model) if moe and not forward_only else None
    try:
        with stats.recording() if stats is not None else nullcontext():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(list(enumerate(microbatches))),
                model=[model],
                num_microbatches=len(microbatches),
                seq_length=seq_plus_one - 1,
                micro_batch_size=micro_batch_size,
                forward_only=forward_only,
            )
    finally:
        config.variable_seq_lengths = variable
    if stats is not None:
        router_metrics = stats.metrics()
        if router_metrics is not None and outputs and isinstance(outputs[-1], dict):
            outputs[-1] = {**outputs[-1], **router_metrics}
    return outputs if parallel_state.is_pipeline_last_stage() else None
