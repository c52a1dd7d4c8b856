"""The optimizer's state in a dist-checkpoint, in model space: one layout for every optimizer.

For each parameter, `optimizer.state.{exp_avg,exp_avg_sq}.<its key>` (and `fp32_param`,
the master copy, for 16-bit models) sharded exactly like the parameter, plus the step
count (and fp16's loss scale) in the common state. So, like the model, it loads at any
TP/PP/DP, into the plain optimizer or the DistributedOptimizer, whichever saved it
(Megatron's `fully_reshardable` idea; its plain optimizer uses the same keys).

Written here rather than taken from Megatron-Core 0.16.1, whose DistributedOptimizer with
torch's Adam (no TE/Apex) cannot build a sharded state dict before a first step, whose
`load_state_dict` gives every parameter one shared `step` tensor (each Adam step then
advances it once per parameter: the inexact resume), and whose `fully_reshardable` load
leaves `step` out and then fails on it. The state is written into the inner optimizer here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

from megatron_opd.checkpoint.megatron_checkpoint import CheckpointMismatchError

OPTIMIZER_FORMAT = "model_space_v1"
_PREFIX = "optimizer.state"
_ADAM_STATE = ("exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------- the optimizer's parameters


@dataclasses.dataclass
class _Slot:
    """One model parameter as an optimizer sees it: `main` is what the inner optimizer
    updates (the parameter itself, its fp32 master copy, or, in the DistributedOptimizer,
    this DP rank's `shard` of the flattened master copy)."""

    model: torch.nn.Parameter
    main: torch.Tensor
    inner: torch.optim.Optimizer
    shard: Optional[slice] = None


def _leaves(optimizer) -> list:
    """Megatron's optimizers inside a ChainedOptimizer (or the one given), stubs left out."""
    leaves = getattr(optimizer, "chained_optimizers", [optimizer])
    return [leaf for leaf in leaves if getattr(leaf, "optimizer", None) is not None]


def _is_distributed(leaf) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(leaf, DistributedOptimizer)


def _slots(leaf) -> Iterator[_Slot]:
    """Every parameter this rank's `leaf` updates, in a fixed order (loading keys by it)."""
    if _is_distributed(leaf):
        yield from _distributed_slots(leaf)
    elif hasattr(leaf, "float16_groups"):  # Float16OptimizerWithFloat16Params: fp32 masters of bf16/fp16
        for models, mains in zip(leaf.float16_groups, leaf.fp32_from_float16_groups):
            yield from (_Slot(model, main, leaf.optimizer) for model, main in zip(models, mains))
        for group in leaf.fp32_from_fp32_groups:
            yield from (_Slot(param, param, leaf.optimizer) for param in group)
    else:  # FP32Optimizer
        for group in leaf.optimizer.param_groups:
            yield from (_Slot(param, param, leaf.optimizer) for param in group["params"])


def _distributed_slots(leaf) -> Iterator[_Slot]:
    """The parameters with a range in this DP rank's share of the grad buffers."""
    for buffer_ranges in leaf.gbuf_ranges:
        for bucket_ranges in buffer_ranges.values():
            for bucket in bucket_ranges:
                for model_param, ranges in bucket["param_map"].items():
                    group, order = leaf.model_param_group_index_map[model_param]
                    main = leaf.optimizer.param_groups[group]["params"][order]
                    shard = slice(ranges["param"].start, ranges["param"].end)
                    yield _Slot(model_param, main, leaf.optimizer, shard)


def _state_keys(inner: torch.optim.Optimizer) -> tuple[str, ...]:
    """Adam's per-parameter tensors (torch's, TE's or Apex's Adam); SGD without momentum has none."""
    return _ADAM_STATE if "adam" in type(inner).__name__.lower() else ()


def _has_master_copy(model: torch.nn.Module) -> bool:
    """16-bit parameters: the optimizer's fp32 master weights are state of their own."""
    return next(model.parameters()).dtype != torch.float32


def _step_of(inner: torch.optim.Optimizer) -> int:
    """Adam's step count (one for all parameters): in the state (torch) or the group (TE/Apex)."""
    for state in inner.state.values():
        if "step" in state:
            return int(state["step"])
    return int(next((group["step"] for group in inner.param_groups if "step" in group), 0))


def _set_state(slot: _Slot, tensors: dict[str, torch.Tensor], step: int) -> None:
    """Adam's state for `slot`, each tensor its own (torch's Adam increments `step` in place)."""
    state = slot.inner.state[slot.main]
    for key, value in tensors.items():
        state[key] = value.to(slot.main.device, torch.float32).clone()
    if _is_torch_adam(slot.inner):  # TE's and Apex's Adam keep it in the param group
        state["step"] = torch.tensor(float(step), dtype=torch.float32)


def _is_torch_adam(inner: torch.optim.Optimizer) -> bool:
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


# ---------------------------------------------------------------- save / load of the optimizer


def _model_tensors(model_sharded: dict) -> dict[int, Any]:
    """id(parameter) -> its ShardedTensor (or factory) in the model's sharded state dict."""
    tensors, _ = extract_sharded_tensors_and_factories(model_sharded)
    return {id(entry.data): entry for entry in nested_values(tensors)}


def _optimizer_keys(model: torch.nn.Module) -> tuple[str, ...]:
    return ("fp32_param",) if _has_master_copy(model) else ()


def optimizer_sharded_state(optimizer, model: torch.nn.Module, model_sharded: dict) -> dict:
    """What is saved: per parameter its model-space state tensors, sharded like the parameter."""
    by_param = _model_tensors(model_sharded)
    tensors: list = []  # a stacked layer's parameters share one key, at their own offsets
    step = 0
    for leaf in _leaves(optimizer):
        keys = _state_keys(leaf.optimizer) + _optimizer_keys(model)
        step = max(step, _step_of(leaf.optimizer))
        if _is_distributed(leaf):
            tensors.extend(_gathered_distributed_state(leaf, model_sharded, keys))
            continue
        for slot in _slots(leaf):
            state = leaf.optimizer.state.get(slot.main, {})
            for key in keys:
                value = slot.main if key == "fp32_param" else state.get(key, torch.zeros_like(slot.main))
                tensors.append(make_sharded_optimizer_tensor(by_param[id(slot.model)], value.detach(),
                                                             f"{_PREFIX}.{key}"))
    common = {"format": OPTIMIZER_FORMAT, "step": step, "grad_scaler": _grad_scaler_state(optimizer)}
    return {**common, "tensors": tensors}


def _gathered_distributed_state(leaf, model_sharded: dict, keys: tuple[str, ...]) -> list:
    """The DistributedOptimizer's shards gathered over DP into parameter shapes (Megatron's
    `fully_reshardable` save), renamed to the plain optimizer's keys ('param' -> 'fp32_param').
    Gathered on DP rank 0 only, over gloo in host memory, where Megatron has the gloo group
    (its "mem_efficient" variant): DP rank 0 then writes all of it, the others none."""
    if not leaf.optimizer.state:
        _allocate_state(leaf)
    metadata = {"distrib_optim_fully_reshardable_mem_efficient": leaf.data_parallel_group_gloo is not None}
    gathered = leaf.sharded_param_state_fully_reshardable(model_sharded, is_loading=False, metadata=metadata)
    tensors = []
    for per_param in (gathered or {}).values():
        for key, entry in per_param.items():
            name = "fp32_param" if key == "param" else key
            if name in keys:
                model_key = entry.key[len(f"{_PREFIX}.{key}."):]
                tensors.append(dataclasses.replace(entry, key=f"{_PREFIX}.{name}.{model_key}"))
    return tensors


def _allocate_state(leaf) -> None:
    """Adam's zero state and step 0, as its first step would create them."""
    for slot in _slots(leaf):
        _set_state(slot, {key: torch.zeros_like(slot.main) for key in _state_keys(slot.inner)}, 0)


def _grad_scaler_state(optimizer) -> Optional[dict]:
    scaler = getattr(_leaves(optimizer)[0], "grad_scaler", None) if _leaves(optimizer) else None
    return scaler.state_dict() if scaler is not None else None


def load_optimizer_state(optimizer, model: torch.nn.Module, model_sharded: dict, dist_dir: Path) -> None:
    """Read each parameter's state at this rank's layout and write it into the optimizer."""
    request = _optimizer_request(optimizer, model, _model_tensors(model_sharded))
    _check_saved_optimizer(request, dist_dir)
    # A DistributedOptimizer rank asks only for the parameters it holds a shard of, so the
    # requests of all ranks need not cover the checkpoint (what the validation checks).
    loaded = dist_checkpointing.load({"optimizer": {"tensors": request}}, str(dist_dir),
                                     validate_access_integrity=False)["optimizer"]
    for index, leaf in enumerate(_leaves(optimizer)):
        for order, slot in enumerate(_slots(leaf)):
            _write_slot(slot, {name: loaded["tensors"][f"{index}.{order}.{name}"]
                               for name in _state_keys(leaf.optimizer) + _optimizer_keys(model)}, loaded["step"])
        if not _is_torch_adam(leaf.optimizer):
            for group in leaf.optimizer.param_groups:
                if "step" in group:
                    group["step"] = loaded["step"]
        if loaded.get("grad_scaler") is not None and getattr(leaf, "grad_scaler", None) is not None:
            leaf.grad_scaler.load_state_dict(loaded["grad_scaler"])


def _optimizer_request(optimizer, model: torch.nn.Module, by_param: dict[int, Any]) -> dict[str, Any]:
    """Empty fp32 tensors for every state tensor this rank's optimizer holds, sharded like
    their parameters; keyed by slot, since a stacked layer's parameters share one key."""
    request = {}
    for index, leaf in enumerate(_leaves(optimizer)):
        for order, slot in enumerate(_slots(leaf)):
            for key in _state_keys(leaf.optimizer) + _optimizer_keys(model):
                empty = torch.empty(slot.model.shape, dtype=torch.float32, device=slot.model.device)
                request[f"{index}.{order}.{key}"] = make_sharded_optimizer_tensor(
                    by_param[id(slot.model)], empty, f"{_PREFIX}.{key}")
    return request


def _write_slot(slot: _Slot, tensors: dict[str, torch.Tensor], step: int) -> None:
    """A parameter's loaded state (whole, at its TP/PP shape) into the optimizer: this DP
    rank's range of it for the DistributedOptimizer; the fp32 master copy too, if any."""
    if slot.shard is not None:
        tensors = {name: value.reshape(-1)[slot.shard] for name, value in tensors.items()}
    master = tensors.pop("fp32_param", None)
    if master is not None:
        slot.main.copy_(master.reshape(slot.main.shape))
    _set_state(slot, tensors, step)


def _check_saved_optimizer(request: dict, dist_dir: Path) -> None:
    """One line instead of dist-checkpointing's traceback: a checkpoint of an older format, or
    without the state this optimizer needs (saved with SGD, or at fp32 for a bf16 run)."""
    saved_format = dist_checkpointing.load_common_state_dict(str(dist_dir)).get("optimizer", {}).get("format")
    if saved_format != OPTIMIZER_FORMAT:
        raise CheckpointMismatchError(
            f"{dist_dir.parent}: optimizer state of format {saved_format!r}; this megatron_opd resumes "
            f"{OPTIMIZER_FORMAT!r} only (the model alone loads: pass the checkpoint as `model` in a new output_dir)")
    saved = dist_checkpointing.load_tensors_metadata(str(dist_dir))
    missing = sorted({entry.key for entry in request.values()} - set(saved))
    if missing:
        raise CheckpointMismatchError(
            f"{dist_dir.parent}: no optimizer state {missing[0]!r} (and {len(missing) - 1} more): it was "
            f"saved with another optimizer.optimizer or training.precision")
