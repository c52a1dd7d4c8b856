"""Training checkpoints: model + optimizer (one dist-checkpoint) + trainer state, saved atomically.

    OUTPUT_DIR/checkpoints/iter_0000010/    a megatron_opd model checkpoint (loadable by
        dist/                              `load_pretrained` and `megatron-opd convert`) whose
        hf/                                dist-checkpoint also holds the optimizer state,
        trainer_state.json                 plus the iteration, LR schedule and data position
        megatron_opd_model.json            written last
    OUTPUT_DIR/checkpoints/latest           the newest complete iteration, updated after the rename

Each checkpoint is written under a temporary name and renamed when complete, so a
save killed midway leaves the previous checkpoint as the latest and loadable.
RNG state is not saved: every step reseeds from (seed, iteration), so a resumed run
draws what the uninterrupted run draws.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from megatron.core import dist_checkpointing

from megatron_opd.checkpoint.megatron_checkpoint import (
    DIST_DIR,
    CheckpointInfo,
    atomic_output_dir,
    load_model_checkpoint,
    read_checkpoint_info,
    save_model_checkpoint,
)

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
# The DistributedOptimizer's default ("fully_sharded_model_space") needs flattened ranges
# that dist-checkpointing now refuses; "dp_reshardable" is Megatron-LM's own default.
_OPTIMIZER_SHARDING = "dp_reshardable"


def checkpoint_root(output_dir: Path | str) -> Path:
    return Path(output_dir) / "checkpoints"


def iteration_dir(output_dir: Path | str, iteration: int) -> Path:
    return checkpoint_root(output_dir) / f"iter_{iteration:07d}"


def latest_checkpoint(output_dir: Path | str) -> Optional[Path]:
    """The newest complete checkpoint, or None."""
    latest = checkpoint_root(output_dir) / LATEST_FILE
    if not latest.is_file():
        return None
    path = iteration_dir(output_dir, int(latest.read_text().strip()))
    read_checkpoint_info(path)  # raises if it is not complete
    return path


def _optimizer_sharded_state(optimizer, model_sharded: dict, is_loading: bool) -> dict:
    kwargs = ({"metadata": {"distrib_optim_sharding_type": _OPTIMIZER_SHARDING}}
              if _is_distributed_optimizer(optimizer) else {})
    return optimizer.sharded_state_dict(model_sharded, is_loading=is_loading, **kwargs)


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def save_training_checkpoint(output_dir: Path | str, iteration: int, model: torch.nn.Module, optimizer,
                             info: CheckpointInfo, hf_dir: Optional[Path], state: dict[str, Any]) -> Path:
    """Collective. Writes `iter_<iteration>` atomically, then points `latest` at it."""
    out = iteration_dir(output_dir, iteration)
    model_sharded = model.sharded_state_dict()
    optimizer_sharded = _optimizer_sharded_state(optimizer, model_sharded, is_loading=False)
    with atomic_output_dir(out, force=True) as staging:
        save_model_checkpoint(model, info, staging, hf_dir=hf_dir, extra_sharded={"optimizer": optimizer_sharded},
                              extra_files={STATE_FILE: {"iteration": iteration, **state}})
    if torch.distributed.get_rank() == 0:
        latest = checkpoint_root(output_dir) / LATEST_FILE
        temporary = latest.with_suffix(".tmp")
        temporary.write_text(f"{iteration}\n")
        temporary.replace(latest)
    torch.distributed.barrier()
    return out


@torch.no_grad()
def load_training_checkpoint(path: Path, model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """Collective. Restores model and optimizer; returns the trainer state (iteration, ...)."""
    load_model_checkpoint(model, path)
    model_sharded = model.sharded_state_dict()
    optimizer_sharded = _optimizer_sharded_state(optimizer, model_sharded, is_loading=True)
    loaded = dist_checkpointing.load({"optimizer": optimizer_sharded}, str(path / DIST_DIR))
    optimizer.load_state_dict(loaded["optimizer"])
    return json.loads((path / STATE_FILE).read_text())
