"""Per-step metrics: one progress line on stdout, `metrics.jsonl`, and TensorBoard.

Only the logging rank (last pipeline stage, first TP and DP rank: where losses are
known) writes; the others hold a disabled writer.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state

_LINE_KEYS = ("loss", "divergence", "sft_loss", "grad_norm", "lr", "tokens_per_s", "teacher_s", "student_s")


def reduce_metrics(outputs: Optional[list[dict]], sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """A step's metrics from the loss outputs of its microbatches (last stage; None elsewhere
    gives {}): every `<name>_sum` summed over microbatches and DP ranks and divided by the
    global token count; every `<name>_max` the largest over microbatches and DP ranks;
    `sums` (this rank's, e.g. sampled tokens) summed over DP ranks as they are."""
    if outputs is None:
        return {}
    group = parallel_state.get_data_parallel_group()
    keys = sorted({key for out in outputs for key in out if key.endswith("_sum")})
    totals = [sum((out[key].double() for out in outputs if key in out), torch.zeros((), dtype=torch.float64))
              for key in keys + ["tokens"]]
    totals += [torch.tensor(float(value), dtype=torch.float64) for value in sums.values()]
    reduced = torch.stack(totals).to(device)
    torch.distributed.all_reduce(reduced, group=group)
    reduced = reduced.tolist()
    tokens = reduced[len(keys)]
    result = {key[:-len("_sum")]: total / max(tokens, 1) for key, total in zip(keys, reduced)}
    result["tokens"] = int(tokens)
    result.update(zip(sums, reduced[len(keys) + 1:]))
    # Every DP rank has the same keys (the same algorithm, the same kind of step).
    maxima = sorted({key for out in outputs for key in out if key.endswith("_max")})
    if maxima:
        largest = torch.stack([max(out[key].double() for out in outputs if key in out) for key in maxima]).to(device)
        torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX, group=group)
        result.update(zip(maxima, largest.tolist()))
    return result


class MetricsWriter:
    def __init__(self, output_dir: Path | str, enabled: bool, tensorboard: bool, total_steps: int):
        self.enabled, self.total_steps = enabled, total_steps
        self._jsonl = None
        self._tensorboard = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(output_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(output_dir / "tensorboard"))

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
        print(f"[{prefix}] step {step}/{self.total_steps} | " + " | ".join(shown), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _format(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"
