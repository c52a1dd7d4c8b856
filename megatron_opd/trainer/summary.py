"""The lines a run prints when it starts: what it is about to do, in one screen.

    run: 4 ranks = TP 2 x PP 1 x DP 2 on cpu (gloo), fp32
    student: /models/qwen2.5-0.5b (qwen2, 494.0M parameters, float32)
    teacher: /models/qwen2.5-1.5b (qwen2, 1.54B parameters, float32)
    data: 9,000 train rows, 100 val rows; 8 sequences per step (at most 16,384 tokens), ...
    schedule: 1,000 steps, lr 1e-05 (cosine, 0 warmup), from iteration 0
    output: /runs/gkd (checkpoints every 100 steps, the newest 3 kept; resume: on)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_opd.config.job import JobConfig
from megatron_opd.runtime import Runtime


def count_parameters(model: torch.nn.Module) -> int:
    """The whole model's parameters (collective over the world's model-parallel and expert
    groups): an embedding tied to the output layer is counted once, on the first stage;
    experts split by expert parallelism (Megatron marks them `allreduce=False`) are summed over
    the expert group (ETP x EP x PP ranks hold one copy of them), the rest over TP x PP."""
    counted = [param for param in model.parameters()
               if parallel_state.is_pipeline_first_stage() or not getattr(param, "shared_embedding", False)]
    device = next(model.parameters()).device
    dense = torch.tensor([sum(p.numel() for p in counted if getattr(p, "allreduce", True))], dtype=torch.float64,
                         device=device)
    torch.distributed.all_reduce(dense, group=parallel_state.get_model_parallel_group())
    experts = torch.tensor([sum(p.numel() for p in counted if not getattr(p, "allreduce", True))],
                           dtype=torch.float64, device=device)
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(experts, group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
    return int(dense.item() + experts.item())


def _amount(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.{3 if count < 10 * size else 1}f}{unit}".replace(".000", "")
    return str(int(count))


def model_line(role: str, path: object, family: str, parameters: int, dtype: torch.dtype) -> str:
    return f"{role}: {path} ({family}, {_amount(parameters)} parameters, {str(dtype).removeprefix('torch.')})"


def start_summary(config: JobConfig, runtime: Runtime, dtype: torch.dtype, models: list[str], train_rows: int,
                  val_rows: Optional[int], iteration: int, resumed_from: Optional[Path]) -> list[str]:
    """The start lines (rank 0 prints them); `models`: each model's `model_line`."""
    parallel, training, optimizer = config.parallel, config.training, config.optimizer
    data_parallel = runtime.data_parallel_size
    experts = (f", experts EP {parallel.expert_model_parallel_size} x ETP {parallel.expert_tensor_size}"
               if parallel.expert_model_parallel_size > 1 else "")
    lines = [f"run: {runtime.world_size} rank(s) = TP {parallel.tensor_model_parallel_size} x "
             f"PP {parallel.pipeline_model_parallel_size} x DP {data_parallel}{experts} on {runtime.device.type} "
             f"({runtime.backend}), {str(dtype).removeprefix('torch.')}", *models]
    if config.teacher_model_server:
        lines.append(f"teacher: server {config.teacher_model_server}")
    elif config.teacher_cache:
        lines.append(f"teacher: cache {config.teacher_cache}")
    elif config.teacher == "self":
        lines.append("teacher: the student itself, fed each row's teacher_prompt (OPSD)")
    for spec in config.teachers:  # several: the remote ones (in-process ones have their model line)
        if spec.model is None:
            lines.append(f"teacher {spec.name}: {spec.source} {spec.server or spec.cache}")
    if config.teachers:
        default = f", default {config.default_teacher}" if config.default_teacher else ""
        lines.append(f"teachers: {', '.join(spec.name for spec in config.teachers)}, each row's named by its "
                     f"{config.teacher_column!r} column{default}")
    microbatches = (f"{training.num_microbatches(data_parallel)} microbatch(es) of {training.micro_batch_size} "
                    "per DP rank" if training.max_tokens_per_microbatch is None else
                    f"packed rows of at most {training.max_tokens_per_microbatch:,} tokens, one per microbatch"
                    if training.pack_sequences else
                    f"microbatches of at most {training.max_tokens_per_microbatch:,} padded tokens (rows by length)")
    data = f"data: {train_rows:,} train rows" + (f", {val_rows:,} val rows" if val_rows is not None else "")
    lines.append(f"{data}; {training.global_batch_size} sequences per step (at most "
                 f"{training.global_batch_size * config.data.max_length:,} tokens), {microbatches}")
    start = f"resumed from {resumed_from} at iteration {iteration}" if resumed_from else "from iteration 0"
    lines.append(f"schedule: {training.train_iters:,} steps, lr {optimizer.lr:g} ({optimizer.lr_decay_style}, "
                 f"{optimizer.lr_warmup_iters} warmup), {start}")
    saves = f"every {training.save_interval} steps" if training.save_interval else "at the end"
    kept = f", the newest {training.save_total_limit} kept" if training.save_total_limit else ", all kept"
    lines.append(f"output: {Path(training.output_dir).resolve()} (checkpoints {saves}{kept}; "
                 f"resume: {'on' if training.resume else 'off'})")
    return lines


__all__ = ["count_parameters", "model_line", "start_summary"]
