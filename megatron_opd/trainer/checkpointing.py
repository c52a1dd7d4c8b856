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

The optimizer's state is saved in model space (`optimizer_checkpoint`): it loads at any
TP/PP/DP, into either optimizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_opd.checkpoint.megatron_checkpoint import (
    DIST_DIR,
    CheckpointInfo,
    atomic_output_dir,
    load_model_checkpoint,
    read_checkpoint_info,
    save_model_checkpoint,
)
from megatron_opd.models.tp_layout import unwrap
from megatron_opd.trainer.optimizer_checkpoint import load_optimizer_state, optimizer_sharded_state

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"


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


# ---------------------------------------------------------------- training checkpoints


def save_training_checkpoint(output_dir: Path | str, iteration: int, model: torch.nn.Module, optimizer,
                             info: CheckpointInfo, hf_dir: Optional[Path], state: dict[str, Any]) -> Path:
    """Collective. Writes `iter_<iteration>` atomically, then points `latest` at it."""
    out = iteration_dir(output_dir, iteration)
    optimizer_sharded = optimizer_sharded_state(optimizer, model, unwrap(model).sharded_state_dict())
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
    """Collective. Restores model and optimizer, at any TP/PP/DP and either optimizer;
    returns the trainer state (iteration, ...)."""
    load_model_checkpoint(model, path)
    load_optimizer_state(optimizer, model, unwrap(model).sharded_state_dict(), path / DIST_DIR)
    return json.loads((path / STATE_FILE).read_text())
