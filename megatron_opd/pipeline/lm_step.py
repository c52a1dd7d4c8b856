"""Next-token cross-entropy over microbatches, through Megatron-Core's pipeline schedule.

The smallest complete training step on the shared machinery (schedule, DDP grad
buffers, vocab-parallel loss); the distillation losses plug into the same schedule.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def lm_forward_backward(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    forward_only: bool = False,
    on_logits: Optional[Callable[[torch.Tensor], None]] = None,
) -> Optional[torch.Tensor]:
    """Run every microbatch of `tokens` `[m, b, s + 1]` (inputs followed by their next-token
    labels) forward, and backward unless `forward_only`.

    Gradients accumulate into the model (DDP `main_grad`), averaged over microbatches.
    `on_logits` sees each microbatch's vocab-parallel logits `[b, s, V/tp]` (last stage).
    Returns the per-microbatch mean losses `[m]` on the last pipeline stage, None elsewhere.
    """
    num_microbatches, micro_batch_size, seq_plus_one = tokens.shape
    seq_length = seq_plus_one - 1
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    position_ids = torch.arange(seq_length, device=device).expand(micro_batch_size, seq_length)

    def forward_step(batches, model):
        batch = next(batches)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        logits = model(inputs, position_ids, None)  # [b, s, V/tp]

        def loss_func(logits: torch.Tensor):
            if on_logits is not None:
                on_logits(logits)
            # Megatron's vocab-parallel cross entropy works in place on `logits`.
            loss = vocab_parallel_cross_entropy(logits, labels).mean()
            # Clone: the schedule divides the returned loss by num_microbatches in place.
            return loss, {"lm_loss": loss.detach().clone()}

        return logits, loss_func

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(tokens),
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.stack([out["lm_loss"] for out in outputs])
