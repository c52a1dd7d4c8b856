"""Where each full (unsharded, single-stage) tensor lives in a TP/PP-split GPTModel.

Megatron marks tensor-parallel parameters with `tensor_model_parallel` and
`partition_dim`; pipeline stages number their layers locally from 0 while
`layer.layer_number` keeps the global (1-based) index. Two layouts need more than
that: the SwiGLU `linear_fc1` weight is `[gate; up]`, and each TP rank holds
`[gate_r; up_r]`; with tied embeddings the last stage holds its own copy of the
word embeddings as `output_layer.weight`.

`load_full_state_dict` copies full tensors into this rank's shards and
`gather_full_tensors` re-assembles full tensors (weights or gradients) from them.
Global names are the local layer spec's: Transformer Engine's norms fused into
`linear_qkv` / `linear_fc1` are named as the local spec's separate norms, so one
name means one tensor whichever spec built the model.
Expert parallelism: each EP rank holds `num_experts / ep` experts of every MoE layer,
numbered locally from 0 (`mlp.experts.local_experts.{i}`, TE's grouped GEMM
`mlp.experts.linear_fc1.weight{i}`); global names number them globally and in the local
spec's form. Expert weights (`param.allreduce` False) split over the expert
tensor-parallel group, not the attention's.
Megatron's dist-checkpointing does this for checkpoints on disk; this module is for
in-memory tensors (tests, HF weights, export).
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")
_TIED_OUTPUT = "output_layer.weight"
_WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
_TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def unwrap(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside Megatron's DDP / Float16Module wrappers."""
    while not isinstance(model, GPTModel):
        if not hasattr(model, "module"):
            raise TypeError(f"{type(model).__name__} does not wrap a GPTModel")
        model = model.module
    return model


def global_name(model: GPTModel, local_name: str) -> str:
    """The name a parameter has in the unsplit model (global layer index, tied output folded)."""
    match = _LOCAL_LAYER.match(local_name)
    if match:
        layer = model.decoder.layers[int(match.group(1))]
        suffix = _global_expert(layer, local_name[match.end():])
        return f"decoder.layers.{layer.layer_number - 1}." + _TE_FUSED_NORMS.get(suffix, suffix)
    if local_name == _TIED_OUTPUT and model.share_embeddings_and_output_weights:
        return _WORD_EMBEDDINGS
    return local_name


def _global_expert(layer: torch.nn.Module, suffix: str) -> str:
    """`suffix` with a local expert index replaced by the global one (this EP rank's offset)."""
    local = _LOCAL_EXPERT.match(suffix)
    grouped = _GROUPED_EXPERT.match(suffix)
    if local is None and grouped is None:
        return suffix
    experts = layer.mlp.experts
    offset = parallel_state.get_expert_model_parallel_rank() * experts.num_local_experts
    if local is not None:
        return f"mlp.experts.local_experts.{offset + int(local.group(1))}.{local.group(2)}"
    return f"mlp.experts.local_experts.{offset + int(grouped.group(3))}.{grouped.group(1)}.{grouped.group(2)}"


def is_expert_param(param: torch.Tensor) -> bool:
    """Megatron marks expert weights `allreduce=False`: they are reduced over the expert
    data-parallel group and split over the expert tensor-parallel group."""
    return getattr(param, "allreduce", True) is False


def tp_group_of(param: torch.Tensor):
    """The tensor-parallel group `param` is split over."""
    if is_expert_param(param):
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def _tp_size_rank(param: torch.Tensor) -> tuple[int, int]:
    if is_expert_param(param):
        return (parallel_state.get_expert_tensor_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_rank())
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


def _is_gated_fc1(model: GPTModel, name: str) -> bool:
    # The dense MLP's, each expert's and the shared expert's linear_fc1 (TE grouped: weight{i}).
    return model.config.gated_linear_unit and re.search(r"linear_fc1\.weight\d*$", name) is not None


def full_to_local(model: GPTModel, name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This TP rank's shard of `full` for parameter `name` (a local name of `model`)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    tp_size, tp_rank = _tp_size_rank(param)
    if _is_gated_fc1(model, name):
        return torch.cat([half.chunk(tp_size, dim)[tp_rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(tp_size, dim)[tp_rank]


def local_to_full(model: GPTModel, name: str, param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """All-gather `local` (this rank's shard, shaped like `param`) into the full tensor."""
    if not getattr(param, "tensor_model_parallel", False):
        return local
    dim = param.partition_dim
    group = tp_group_of(param)
    tp_size, _ = _tp_size_rank(param)
    if tp_size == 1:
        return local

    def gather(shard: torch.Tensor) -> torch.Tensor:
        if dim == 0:  # straight into the full tensor: no per-rank copies to concatenate
            full = shard.new_empty(shard.shape[0] * tp_size, *shard.shape[1:])
            torch.distributed.all_gather_into_tensor(full, shard.contiguous(), group=group)
            return full
        shards = [torch.empty_like(shard) for _ in range(tp_size)]
        torch.distributed.all_gather(shards, shard.contiguous(), group=group)
        return torch.cat(shards, dim)

    if _is_gated_fc1(model, name):
        return torch.cat([gather(half) for half in local.chunk(2, dim)], dim)
    return gather(local)


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, full_state: Mapping[str, torch.Tensor]) -> None:
    """Copy full tensors (keyed by global names) into this rank's parameters.

    Every local parameter must be found; keys for other pipeline stages (and the experts
    of other expert-parallel ranks) are ignored.
    """
    gpt = unwrap(model)
    missing = []
    for name, param in gpt.named_parameters():
        key = global_name(gpt, name)
        if key not in full_state:
            missing.append(key)
            continue
        shard = full_to_local(gpt, name, param, full_state[key])
        if shard.shape != param.shape:
            raise ValueError(f"{key}: full tensor {tuple(full_state[key].shape)} gives shard "
                             f"{tuple(shard.shape)}, parameter is {tuple(param.shape)}")
        param.copy_(shard)
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} parameter(s): {', '.join(missing)}")


@torch.no_grad()
def gather_full_tensors(
    model: torch.nn.Module,
    select: Callable[[torch.nn.Parameter], Optional[torch.Tensor]] = lambda p: p,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(global_name, full_tensor)` for this stage, `select(param)` picking what to gather.

    Collective over the TP group (the expert TP group for expert weights): every TP rank
    must iterate to the end. Under expert parallelism a rank yields only its own experts.
    """
    gpt = unwrap(model)
    for name, param in gpt.named_parameters():
        tensor = select(param)
        if tensor is not None:
            yield global_name(gpt, name), local_to_full(gpt, name, param, tensor.detach())
