"""Router statistics of a mixture-of-experts model over one call of the schedule.

The load-balancing loss itself is Megatron's: each MoE layer's router attaches
`coeff * L * n` to its output (`MoEAuxLossAutoScaler`), `L` the switch loss of the
microbatch and `n` its valid tokens. We pass the routers `padding_mask = ~loss_mask`
(`pipeline.schedule`), so `L` is computed over the counted tokens and `n` is their count;
`finalize_model_grads` then divides every gradient once by the global batch's token
count N, as it does for the distillation loss. The aux term in the objective is thus
`coeff * sum_layers sum_mb n_mb L_mb / N`, a per-token loss like the divergence, and it
is what `moe_aux_loss` reports (same normalisation as every other `*_sum` metric). Under
sequence parallelism each TP rank routes its share of a microbatch's tokens and its tracker
holds a part of `L_mb` (Megatron's global-batch form: the parts sum to `L_mb`) while `n_mb` is
the microbatch's count over the TP group: both are summed over TP per router call before the
product (a sum of the ranks' own `L_r n_r` would report 0.74x of the loss at TP=2).

Expert load, per MoE layer: the global batch's counted tokens routed to each expert
(top-k picks, so they sum to k * N). `moe_expert_tokens_max`: the most any expert got in one layer;
`moe_expert_load_max`: the largest max/mean ratio over layers (1 = perfectly balanced).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

from megatron_opd.models.tp_layout import unwrap

_TRACKED = {"load_balancing_loss": "moe_aux_loss", "z_loss": "moe_z_loss"}


class RouterStats:
    """Hooks on this stage's routers; `metrics()` after the schedule (collective over PP)."""

    def __init__(self, model: torch.nn.Module):
        gpt = unwrap(model)
        self.config = gpt.config
        self.routers = [layer.mlp.router for layer in gpt.decoder.layers if hasattr(layer.mlp, "router")]
        num_layers, experts = self.config.num_layers, self.config.num_moe_experts
        self.device = next(gpt.parameters()).device
        self.tokens_per_expert = torch.zeros(num_layers, experts, dtype=torch.float64, device=self.device)
        self.losses: list[list[float]] = []  # per router call: this rank's L (part) of each _TRACKED
        self.valid: list[float] = []  # per router call: this rank's counted tokens
        self._before: dict[tuple[int, str], float] = {}
        self._handles = []

    def _tracked(self, name: str, layer: int) -> float:
        entry = get_moe_layer_wise_logging_tracker().get(name)
        return float(entry["values"][layer]) if entry is not None else 0.0

    def _pre_hook(self, router, args):
        for name in _TRACKED:
            self._before[(router.layer_number, name)] = self._tracked(name, router.layer_number - 1)

    def _hook(self, router, args, output):
        # MoELayer.route calls router(hidden_states, padding_mask) positionally
        padding = args[1] if len(args) > 1 else None
        _, routing_map = output
        if padding is not None:
            routing_map = routing_map & ~padding.reshape(-1, 1)
        counted = routing_map.sum(dim=0).double()
        valid = counted.sum() / self.config.moe_router_topk
        self.tokens_per_expert[router.layer_number - 1] += counted
        # The tracker adds this microbatch's unscaled loss L_mb (under SP this rank's part).
        self.losses.append([self._tracked(name, router.layer_number - 1) - self._before[(router.layer_number, name)]
                            for name in _TRACKED])
        self.valid.append(float(valid))

    @contextmanager
    def recording(self) -> Iterator["RouterStats"]:
        self._handles = [handle for router in self.routers for handle in (
            router.register_forward_pre_hook(self._pre_hook), router.register_forward_hook(self._hook))]
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def metrics(self) -> Optional[dict[str, torch.Tensor]]:
        """Collective over the pipeline and data-parallel groups; the metrics on the last stage,
        None elsewhere. Expert counts are of the global batch (summed over DP; sequence
        parallelism splits each microbatch's tokens over TP: summed over TP then)."""
        coeffs = {"load_balancing_loss": self.config.moe_aux_loss_coeff, "z_loss": self.config.moe_z_loss_coeff}
        counts = self.tokens_per_expert.clone()
        torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        # [calls, 1 + len(_TRACKED)]: each router call's counted tokens and losses
        calls = torch.tensor([[valid, *losses] for valid, losses in zip(self.valid, self.losses)],
                             dtype=torch.float64, device=self.device).reshape(-1, 1 + len(_TRACKED))
        if self.config.sequence_parallel:
            tp_group = parallel_state.get_tensor_model_parallel_group()
            torch.distributed.all_reduce(counts, group=tp_group)
            torch.distributed.all_reduce(calls, group=tp_group)
        weighted = (calls[:, 1:] * calls[:, :1]).sum(dim=0)  # [len(_TRACKED)]: sum over calls of n L
        stacked = torch.cat([counts.flatten(), weighted])
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(stacked, group=parallel_state.get_pipeline_model_parallel_group())
        if not parallel_state.is_pipeline_last_stage():
            return None
        counts = stacked[: self.tokens_per_expert.numel()].view_as(self.tokens_per_expert)
        counts = counts[counts.sum(dim=1) > 0]  # the MoE layers
        result = {}
        if counts.numel():
            result["moe_expert_tokens_max"] = counts.max()
            result["moe_expert_load_max"] = (counts.max(dim=1).values / counts.mean(dim=1)).max()
        for (name, metric), value in zip(_TRACKED.items(), stacked[self.tokens_per_expert.numel():]):
            if coeffs[name]:
                result[f"{metric}_sum"] = value * coeffs[name]
        return result


def sync_router_normalization(model: torch.nn.Module) -> None:
    """Megatron's routers copy `config.calculate_per_token_loss` when built; the trainer turns
    it on when it wraps the built model in DDP (`trainer.optim`). A router left at False
    attaches `coeff * L` instead of `coeff * L * n`, so after the division by the global
    token count its gradient would be n_mb times too small. Copy the flag at each call."""
    gpt = unwrap(model)
    for layer in gpt.decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if router is not None:
            router.calculate_per_token_loss = gpt.config.calculate_per_token_loss


def is_moe(model: torch.nn.Module) -> bool:
    return getattr(unwrap(model).config, "num_moe_experts", None) is not None
