"""Per-step metrics: one progress line on stdout, `metrics.jsonl`, and TensorBoard.

Only the logging rank (last pipeline stage, first TP and DP rank: where losses are
known) writes; the others hold a disabled writer.

A run that starts at iteration k (resumed from its checkpoint, or 0) continues the
record of the run it resumes: `metrics.jsonl` keeps the records up to step k and drops
later ones (steps an interrupted run logged after its last checkpoint, which the resumed
run trains again), and TensorBoard is told to purge its events from step k + 1.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state

_LINE_KEYS = ("loss", "divergence", "sft_loss", "grad_norm", "lr", "tokens_per_s", "teacher_s", "student_s")


def reduce_metrics(outputs: Optional[list[dict]], sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """A step's metrics from the loss outputs of its microbatches (last stage; None elsewhere
    gives {}): every `<name>_sum` summed over microbatches and DP ranks and divided by the
    global token count; every `<name>_count` summed as it is; every `<name>_max` the largest
    over microbatches and DP ranks; `sums` (this rank's, e.g. sampled tokens) summed over DP
    ranks as they are. Per teacher (`<metric>/<teacher>_sum`, `tokens/<teacher>_count`), also
    `<metric>_mean/<teacher>`: the metric per token of that teacher's rows."""
    if outputs is None:
        return {}
    group = parallel_state.get_data_parallel_group()
    keys = sorted({key for out in outputs for key in out if key.endswith(("_sum", "_count"))})
    totals = [sum((out[key].double() for out in outputs if key in out), torch.zeros((), dtype=torch.float64))
              for key in keys + ["tokens"]]
    totals += [torch.tensor(float(value), dtype=torch.float64) for value in sums.values()]
    reduced = torch.stack(totals).to(device)
    # One data-parallel rank: nothing to sum (a gloo call costs ~0.15 ms of a toy step).
    shared = torch.distributed.get_world_size(group) > 1
    if shared:
        torch.distributed.all_reduce(reduced, group=group)
    reduced = reduced.tolist()
    tokens = reduced[len(keys)]
    result = {key[:-len("_sum")]: total / max(tokens, 1) for key, total in zip(keys, reduced) if key.endswith("_sum")}
    result.update({key[:-len("_count")]: int(total) for key, total in zip(keys, reduced) if key.endswith("_count")})
    for key, total in zip(keys, reduced):
        metric, _, teacher = key[:-len("_sum")].rpartition("/")
        if key.endswith("_sum") and metric and f"tokens/{teacher}" in result:
            result[f"{metric}_mean/{teacher}"] = total / max(result[f"tokens/{teacher}"], 1)
    result["tokens"] = int(tokens)
    result.update(zip(sums, reduced[len(keys) + 1:]))
    # Every DP rank has the same keys (the same algorithm, the same kind of step).
    maxima = sorted({key for out in outputs for key in out if key.endswith("_max")})
    if maxima:
        largest = torch.stack([max(out[key].double() for out in outputs if key in out) for key in maxima]).to(device)
        if shared:
            torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX, group=group)
        result.update(zip(maxima, largest.tolist()))
    return result


def _keep_records_until(path: Path, step: int) -> None:
    """Rewrite `path` (atomically) without the records of steps after `step`."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) == len(lines):
        return
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


class MetricsWriter:
    def __init__(self, output_dir: Path | str, enabled: bool, tensorboard: bool, total_steps: int,
                 start_step: int = 0):
        self.enabled, self.total_steps = enabled, total_steps
        self._jsonl = None
        self._tensorboard = None
        # The ETA: seconds per step since the first logged step (model loading is not a step).
        self._first_logged: Optional[tuple[int, float]] = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        _keep_records_until(output_dir / "metrics.jsonl", start_step)
        self._jsonl = open(output_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)

    def _eta(self, step: int) -> Optional[str]:
        now = time.monotonic()
        if self._first_logged is None:
            self._first_logged = (step, now)
            return None
        first_step, first_time = self._first_logged
        if step <= first_step:
            return None
        remaining = (now - first_time) / (step - first_step) * max(self.total_steps - step, 0)
        return _duration(remaining)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for key, value in metrics.items():
                self._tensorboard.add_scalar(f"{prefix}/{key}", value, step)
            self._tensorboard.flush()
        shown = [f"{key} {_format(metrics[key])}" for key in _LINE_KEYS if key in metrics]
        shown += [f"{key} {_format(value)}" for key, value in metrics.items() if key not in _LINE_KEYS]
        eta = self._eta(step) if prefix == "train" else None
        if eta is not None:
            shown.append(f"eta {eta}")
        print(f"[{prefix}] step {step}/{self.total_steps} | " + " | ".join(shown), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _format(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"
