"""The student's DDP wrapper, Megatron-Core optimizer and LR schedule, from our config."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_opd.config.job import OptimizerConfig
from megatron_opd.config.schema import ConfigError


def wrap_student(model: torch.nn.Module, use_distributed_optimizer: bool) -> DistributedDataParallel:
    """Megatron DDP with per-token loss normalization across microbatches and DP ranks.

    `calculate_per_token_loss` makes the schedule keep loss sums and token counts, and
    `finalize_model_grads` divide the summed gradients once by the global token count.
    """
    config = model.config
    config.calculate_per_token_loss = True
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer),
        model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp


def build_optimizer(ddp_model: DistributedDataParallel, optimizer: OptimizerConfig, train_iters: int):
    """Megatron's optimizer (mixed precision with fp32 master weights for bf16/fp16 params)
    and its LR / weight-decay scheduler, stepped once per iteration."""
    params_dtype = next(ddp_model.parameters()).dtype
    megatron_config = MegatronOptimizerConfig(
        optimizer=optimizer.optimizer,
        lr=optimizer.lr,
        min_lr=optimizer.min_lr,
        weight_decay=optimizer.weight_decay,
        adam_beta1=optimizer.adam_beta1,
        adam_beta2=optimizer.adam_beta2,
        adam_eps=optimizer.adam_eps,
        sgd_momentum=0.0,
        clip_grad=optimizer.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=optimizer.use_distributed_optimizer,
    )
    megatron_optimizer = get_megatron_optimizer(megatron_config, [ddp_model])
    scheduler = OptimizerParamScheduler(
        megatron_optimizer,
        init_lr=0.0 if optimizer.lr_warmup_iters else optimizer.lr,
        max_lr=optimizer.lr,
        min_lr=optimizer.min_lr,
        lr_warmup_steps=optimizer.lr_warmup_iters,
        lr_decay_steps=max(train_iters, optimizer.lr_warmup_iters + 1),
        lr_decay_style=optimizer.lr_decay_style,
        start_wd=optimizer.weight_decay,
        end_wd=optimizer.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
    )
    return megatron_optimizer, scheduler


def resolve_distributed_optimizer(requested: Optional[bool], optimizer: str) -> bool:
    """Megatron's DistributedOptimizer needs Transformer Engine's or Apex's Adam to checkpoint
    exactly (with torch's Adam, 0.16 loses state on resume): on by default where they exist."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    if requested is None:
        return HAVE_APEX_OR_TE and optimizer == "adam"
    if requested and not HAVE_APEX_OR_TE:
        raise ConfigError("optimizer.use_distributed_optimizer=True is invalid without Transformer Engine or "
                          "Apex: Megatron-Core's DistributedOptimizer does not resume torch's Adam state "
                          "exactly; set it to false or null")
    return requested
