"""HF weights into a live TP/PP-sharded GPTModel, and out of it, one tensor at a time.

`load_hf_weights` reads, for each local parameter, the HF tensors it is made of
(memory-mapped safetensors), builds the full Megatron tensor and copies this rank's
shard: peak memory is the model shard plus one full tensor.

`export_hf_weights` is the reverse for a model that may be split over TP and PP: for
each HF tensor in HF order, the owning stage all-gathers it across TP, its first TP
rank sends it to the destination rank, which yields it. The destination never holds
more than one full tensor, so it serves `megatron-to-hf` and a streaming weight sync
into a rollout engine alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from megatron.core import parallel_state

from megatron_opd.checkpoint.errors import CheckpointMismatchError
from megatron_opd.checkpoint.hf_io import HFWeightReader, StreamingSafetensorsWriter, config_with_dtype
from megatron_opd.checkpoint.weight_map import WeightRule, to_hf, to_megatron, weight_rules
from megatron_opd.config.model import ModelConfig
from megatron_opd.models.tp_layout import (
    full_to_local,
    global_name,
    is_expert_param,
    local_to_full,
    tp_group_of,
    unwrap,
)
from megatron_opd.runtime.progress import Progress

ProgressCallback = Callable[[str], None]


def check_hf_tensor_names(reader: HFWeightReader, config: ModelConfig) -> None:
    """Every tensor the map needs is in the checkpoint, and nothing the map would drop."""
    expected = {name for rule in weight_rules(config) for name in rule.hf_names}
    present = set(reader.names())
    if config.tie_word_embeddings:
        # Tied checkpoints may still store the head; it must then equal the embedding.
        present.discard("lm_head.weight")
    missing, unused = sorted(expected - present), sorted(present - expected)
    if missing:
        raise CheckpointMismatchError(
            f"{reader.directory} lacks {len(missing)} tensor(s) its config.json needs, first {missing[:3]}: "
            "the weights are incomplete or of another model; download the model again")
    if unused:
        raise CheckpointMismatchError(
            f"{reader.directory} has {len(unused)} tensor(s) the model would not use, first {unused[:3]}: "
            "its config.json does not describe these weights; download the model again")
    if config.tie_word_embeddings and "lm_head.weight" in reader:
        if not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            raise CheckpointMismatchError(f"{reader.directory}: tie_word_embeddings is true but lm_head.weight "
                                          "differs from model.embed_tokens.weight: its config.json does not "
                                          "describe these weights")


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, config: ModelConfig, reader: HFWeightReader,
                    progress: Optional[ProgressCallback] = None) -> None:
    """Copy the HF checkpoint's weights into this rank's parameters (cast to their dtype)."""
    gpt = unwrap(model)
    check_hf_tensor_names(reader, config)
    rules = {rule.megatron_name: rule for rule in weight_rules(config)}
    for name, param in gpt.named_parameters():
        rule = rules[global_name(gpt, name)]
        hf_tensors = [reader.get(hf_name) for hf_name in rule.hf_names]
        try:
            full = to_megatron(rule, hf_tensors, config, gpt.vocab_size)
            shard = full_to_local(gpt, name, param, full.to(param.dtype))
        except (RuntimeError, ValueError) as error:
            shapes = {n: tuple(t.shape) for n, t in zip(rule.hf_names, hf_tensors)}
            raise CheckpointMismatchError(f"{reader.directory}: HF tensors {shapes} do not fit "
                                          f"{rule.megatron_name} of its config.json ({error}): the config does "
                                          "not describe these weights") from error
        if shard.shape != param.shape:
            shapes = {n: tuple(t.shape) for n, t in zip(rule.hf_names, hf_tensors)}
            raise CheckpointMismatchError(f"{reader.directory}: HF tensors {shapes} give a {rule.megatron_name} "
                                          f"shard of {tuple(shard.shape)}, the model's is {tuple(param.shape)}: "
                                          "its config.json does not describe these weights")
        param.copy_(shard)
        if progress is not None:
            progress(rule.megatron_name)


def _full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= torch.distributed.get_world_size(tp_group_of(param))
    return tuple(shape)


def hf_tensor_plan(config: ModelConfig, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every HF tensor `export_hf_weights` yields, in order."""
    hidden, head_dim, ffn = config.hidden_size, config.head_dim, config.ffn_hidden_size
    q_rows, kv_rows = config.num_attention_heads * head_dim, config.query_groups * head_dim
    shapes = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "lm_head.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    per_layer = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden), "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden), "self_attn.q_proj.bias": (q_rows,),
        "self_attn.k_proj.bias": (kv_rows,), "self_attn.v_proj.bias": (kv_rows,),
        "self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,),
        "self_attn.o_proj.weight": (hidden, q_rows), "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden), "mlp.down_proj.weight": (hidden, ffn),
    }
    plan = []
    for rule in weight_rules(config):
        for name in rule.hf_names:
            key = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
            shape = shapes.get(name) or per_layer.get(key) or _moe_tensor_shape(config, key)
            plan.append((name, shape, dtype))
    return plan


def _moe_tensor_shape(config: ModelConfig, key: str) -> tuple[int, ...]:
    """Shape of an expert-layer HF tensor, `key` without its `model.layers.{i}.` prefix."""
    hidden = config.hidden_size
    block, _, rest = key.partition(".")  # mlp / block_sparse_moe
    if rest == "gate.weight":
        return (config.num_experts, hidden)
    if rest == "shared_expert_gate.weight":
        return (1, hidden)
    ffn = config.moe_shared_expert_ffn_hidden_size if rest.startswith("shared_expert.") else \
        config.expert_ffn_hidden_size
    projection = rest.rsplit(".", 2)[-2]
    if projection in ("gate_proj", "up_proj", "w1", "w3"):
        return (ffn, hidden)
    if projection in ("down_proj", "w2"):
        return (hidden, ffn)
    raise KeyError(f"no shape known for HF tensor {key!r} ({block})")


def export_hf_weights(
    model: torch.nn.Module, config: ModelConfig, dst_rank: Optional[int] = 0, to_cpu: bool = True
) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """Yield `(hf_name, full_tensor)` for every HF tensor, in `hf_tensor_plan` order.

    Collective over the whole world: every rank must iterate to the end. The tensors
    arrive on global rank `dst_rank` (padding rows stripped); other ranks get `None`.
    Data-parallel replicas other than the first only take part in the bookkeeping.

    `dst_rank=None`: every data-parallel replica streams its own copy to its own first
    rank (TP rank 0 of its first stage), e.g. one rollout engine per replica; the
    replicas' gathers and sends run side by side. `to_cpu=False` keeps the tensors on the
    model's device (a GPU rollout engine takes them from there).
    """
    gpt = unwrap(model)
    rank = torch.distributed.get_rank()
    local = {global_name(gpt, name): (name, param) for name, param in gpt.named_parameters()}
    # Which rank holds which tensor: a few KB of names and shapes, once.
    mine = {key: (_full_shape(param), param.dtype, is_expert_param(param)) for key, (_, param) in local.items()}
    # (TP rank, PP rank, DP rank) for dense weights, (expert TP rank, -, expert DP rank) for experts
    position = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank(),
                parallel_state.get_data_parallel_rank(), parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_data_parallel_rank())
    holdings: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(holdings, (rank, position, mine))
    replica = position[2] if dst_rank is None else 0
    if dst_rank is None:
        dst_rank = next(holder for holder, (tp, pp, dp, _, _), _ in holdings if (tp, pp, dp) == (0, 0, replica))
    expert_replicas = parallel_state.get_expert_data_parallel_world_size()
    source: dict[str, tuple[int, tuple[int, ...], torch.dtype, bool]] = {}
    for holder, (tp, _, dp, etp, edp), tensors in sorted(holdings, key=lambda item: item[0]):
        for key, (shape, dtype, expert) in tensors.items():
            first = (etp, edp) == (0, replica % expert_replicas) if expert else (tp, dp) == (0, replica)
            if first and key not in source:
                source[key] = (holder, shape, dtype, expert)
    tp_group_ranks = set(torch.distributed.get_process_group_ranks(
        parallel_state.get_tensor_model_parallel_group()))
    expert_tp_group_ranks = set(torch.distributed.get_process_group_ranks(
        parallel_state.get_expert_tensor_parallel_group()))

    for rule in weight_rules(config):
        if rule.megatron_name not in source:
            raise KeyError(f"no rank holds {rule.megatron_name}: the model does not match the config")
        src, shape, dtype, expert = source[rule.megatron_name]
        full = None
        group_ranks = expert_tp_group_ranks if expert else tp_group_ranks
        if src in group_ranks:  # this rank's stage (and EP rank) owns the tensor: gather it across TP
            name, param = local[rule.megatron_name]
            full = local_to_full(gpt, name, param, param.detach())
        if rank == dst_rank:
            if full is None:
                full = torch.empty(shape, dtype=dtype, device=_device(gpt))
                torch.distributed.recv(full, src)
            yield from zip(rule.hf_names, _to_hf(rule, full, config, to_cpu))
        else:
            if rank == src:
                torch.distributed.send(full.contiguous(), dst_rank)
            for hf_name in rule.hf_names:
                yield hf_name, None


def write_hf_weights(model: torch.nn.Module, config: ModelConfig, directory: Path, dtype: torch.dtype,
                     max_shard_bytes: int = 5 * 2**30, label: str = "writing HF weights") -> None:
    """Stream `export_hf_weights` into safetensors shards in `directory` on global rank 0,
    cast to `dtype`, and make a `config.json` already there state `dtype` (`config_with_dtype`):
    it came from the source model, whose dtype may differ. Collective: every rank calls."""
    plan = hf_tensor_plan(config, dtype)
    writer = StreamingSafetensorsWriter(directory, plan, max_shard_bytes) if torch.distributed.get_rank() == 0 else None
    progress = Progress(len(plan), label)
    for name, tensor in export_hf_weights(model, config):
        if writer is not None:
            writer.write(name, tensor.to(dtype))
        progress(name)
    if writer is not None:
        writer.close()
        config_file = Path(directory) / "config.json"
        if config_file.is_file():
            hf_config = config_with_dtype(json.loads(config_file.read_text()), dtype)
            config_file.write_text(json.dumps(hf_config, indent=2) + "\n")
    progress.finish()


def _device(gpt: torch.nn.Module) -> torch.device:
    return next(gpt.parameters()).device


def _to_hf(rule: WeightRule, full: torch.Tensor, config: ModelConfig, to_cpu: bool) -> list[torch.Tensor]:
    return [(tensor.to("cpu") if to_cpu else tensor).contiguous() for tensor in to_hf(rule, full, config)]
