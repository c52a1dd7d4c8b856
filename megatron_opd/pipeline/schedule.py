"""Microbatches through Megatron-Core's forward-backward schedule, ending at the final hidden states.

Every model here (student, teacher) runs through `get_forward_backward_func`, so
pipeline parallelism, its p2p communication and the interleaving of forward and
backward are Megatron's own. The last stage stops before the LM head
(`models.outputs.forward_hidden_states`) and hands the hidden states to a loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_opd.models.outputs import forward_hidden_states


@dataclass
class Microbatch:
    """One microbatch on this data-parallel rank.

    tokens `[b, s + 1]`: inputs followed by their next-token labels; loss_mask `[b, s]`:
    True where predicting `tokens[:, t + 1]` counts.
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def labels(self) -> torch.Tensor:
        return self.tokens[:, 1:]

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device: torch.device) -> "Microbatch":
        return Microbatch(self.tokens.to(device), self.loss_mask.to(device))


# loss(index of the microbatch, the microbatch, last-stage hidden states [s(/tp), b, H])
LossFunction = Callable[[int, Microbatch, torch.Tensor], tuple]


def run_microbatches(model: torch.nn.Module, microbatches: list[Microbatch], loss: LossFunction,
                     forward_only: bool) -> Optional[list]:
    """Forward (and backward unless `forward_only`) every microbatch; all must share `[b, s + 1]`.

    `loss` runs on the last stage and returns what Megatron's schedule takes from a loss
    function: `(loss, num_tokens, metrics)` with per-token normalization
    (`config.calculate_per_token_loss`), or `(loss, metrics)`. Returns the metrics of
    every microbatch on the last stage, None on other stages.
    """
    if not microbatches:
        raise ValueError("run_microbatches needs at least one microbatch")
    micro_batch_size, seq_plus_one = microbatches[0].tokens.shape
    device = next(model.parameters()).device
    seq_length = seq_plus_one - 1
    position_ids = torch.arange(seq_length, device=device).expand(micro_batch_size, seq_length)

    def forward_step(iterator, model):
        index, batch = next(iterator)
        batch = batch.to(device)
        hidden = forward_hidden_states(model, batch.input_ids, position_ids)
        return hidden, lambda output: loss(index, batch, output)

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(list(enumerate(microbatches))),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return outputs if parallel_state.is_pipeline_last_stage() else None
