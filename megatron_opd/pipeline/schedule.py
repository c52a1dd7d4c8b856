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
from megatron.core.utils import get_model_config

from megatron_opd.models.outputs import forward_hidden_states
from megatron_opd.pipeline.segments import packed_inputs


@dataclass
class Microbatch:
    """One microbatch on this data-parallel rank.

    tokens `[b, s + 1]`: inputs followed by their next-token labels; loss_mask `[b, s]`:
    True where predicting `tokens[:, t + 1]` counts; rows `(b,)`: the index of each row in the
    step's example list (microbatches built by a token budget hold the examples sorted by length;
    packed ones several per row, in packing order).
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    rows: tuple[int, ...] = ()
    # packed rows (`pipeline.packing`): the example of each input position `[b, s]`, 0 for padding
    segments: Optional[torch.Tensor] = None

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
        segments = self.segments.to(device) if self.segments is not None else None
        return Microbatch(self.tokens.to(device), self.loss_mask.to(device), self.rows, segments)


# loss(index of the microbatch, the microbatch, last-stage hidden states [s(/tp), b, H])
LossFunction = Callable[[int, Microbatch, torch.Tensor], tuple]


def run_microbatches(model: torch.nn.Module, microbatches: list[Microbatch], loss: LossFunction,
                     forward_only: bool) -> Optional[list]:
    """Forward (and backward unless `forward_only`) every microbatch.

    `loss` runs on the last stage and returns what Megatron's schedule takes from a loss
    function: `(loss, num_tokens, metrics)` with per-token normalization
    (`config.calculate_per_token_loss`), or `(loss, metrics)`. Returns the metrics of
    every microbatch on the last stage, None on other stages.

    Microbatches may differ in shape `[b, s + 1]` (token-budget batching): without pipeline
    parallelism Megatron's schedule takes each as it comes; with it the stages exchange each
    activation's shape before the activation (`variable_seq_lengths`, switched on for the call).
    """
    if not microbatches:
        raise ValueError("run_microbatches needs at least one microbatch")
    shapes = {tuple(batch.tokens.shape) for batch in microbatches}
    micro_batch_size, seq_plus_one = max(shapes)
    device = next(model.parameters()).device
    config = get_model_config(model)

    def forward_step(iterator, model):
        index, batch = next(iterator)
        batch = batch.to(device)
        b, s = batch.input_ids.shape
        position_ids, attention_mask = torch.arange(s, device=device).expand(b, s), None
        if batch.segments is not None:  # several examples per row: their own positions and causal masks
            position_ids, attention_mask = packed_inputs(batch.segments)
        hidden = forward_hidden_states(model, batch.input_ids, position_ids, attention_mask=attention_mask)
        return hidden, lambda output: loss(index, batch, output)

    variable = config.variable_seq_lengths
    # One shape: the receiving stage allocates [s(/tp), b, H] from seq_length and micro_batch_size.
    config.variable_seq_lengths = variable or len(shapes) > 1
    try:
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(list(enumerate(microbatches))),
            model=[model],
            num_microbatches=len(microbatches),
            seq_length=seq_plus_one - 1,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
    finally:
        config.variable_seq_lengths = variable
    return outputs if parallel_state.is_pipeline_last_stage() else None
