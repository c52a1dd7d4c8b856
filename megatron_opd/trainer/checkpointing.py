"""Training checkpoints: model + optimizer (one dist-checkpoint) + trainer state, saved atomically.

    OUTPUT_DIR/checkpoints/iter_0000010/    a megatron_opd model checkpoint (loadable by
        dist/                              `load_pretrained` and `megatron-opd convert`) whose
        hf/                                dist-checkpoint also holds the optimizer state,
        trainer_state.json                 plus the iteration, LR schedule and data position
        megatron_opd_model.json            written last
    OUTPUT_DIR/checkpoints/latest           the newest complete iteration, updated after the rename

Each checkpoint is written under a temporary name and renamed when complete, so a
save killed midway leaves the previous checkpoint as the latest and loadable. With
`save_total_limit` N, the oldest checkpoints beyond the newest N are removed once a new
one is complete (renamed away first, so a removal cut short never leaves a checkpoint
that looks complete); the one `latest` names is never removed.
RNG state is not saved: every step reseeds from (seed, iteration), so a resumed run
draws what the uninterrupted run draws.

The optimizer's state is saved in model space (`optimizer_checkpoint`): it loads at any
TP/PP/DP, into either optimizer.
"""

from __future__ import annotations

import json
import shutil
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


def read_training_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer state (iteration, schedule, data position, config, identity)."""
    return json.loads((path / STATE_FILE).read_text())


def prune_checkpoints(output_dir: Path | str, keep: int) -> list[Path]:
    """Remove the oldest complete checkpoints beyond the newest `keep`, never the latest
    (rank 0; returns what was removed)."""
    root = checkpoint_root(output_dir)
    latest = (root / LATEST_FILE).read_text().strip() if (root / LATEST_FILE).is_file() else None
    complete = sorted(path for path in root.glob("iter_*") if path.is_dir() and path.name[5:].isdigit())
    removed = []
    for path in complete[:-keep] if keep else []:
        if latest is not None and int(path.name[5:]) == int(latest):
            continue
        doomed = path.with_name(f".{path.name}.removing")
        path.rename(doomed)
        shutil.rmtree(doomed)
        removed.append(path)
    return removed


# ---------------------------------------------------------------- training checkpoints


def save_training_checkpoint(output_dir: Path | str, iteration: int, model: torch.nn.Module, optimizer,
                             info: CheckpointInfo, hf_dir: Optional[Path], state: dict[str, Any],
                             keep: Optional[int] = None) -> tuple[Path, list[Path]]:
    """Collective. Writes `iter_<iteration>` atomically, then points `latest` at it; with
    `keep`, removes the checkpoints beyond the newest `keep`. Returns the checkpoint and
    the removed ones (rank 0's list; empty elsewhere)."""
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
    removed = prune_checkpoints(output_dir, keep) if keep and torch.distributed.get_rank() == 0 else []
    torch.distributed.barrier()
    return out, removed


@torch.no_grad()
def load_training_checkpoint(path: Path, model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """Collective. Restores model and optimizer, at any TP/PP/DP and either optimizer;
    returns the trainer state (iteration, ...)."""
    load_model_checkpoint(model, path)
    load_optimizer_state(optimizer, model, unwrap(model).sharded_state_dict(), path / DIST_DIR)
    return read_training_state(path)
