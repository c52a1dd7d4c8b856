"""Forward-only passes that keep one value per microbatch: a teacher's hidden states, old log-probs.

Megatron's schedule hands the last stage's output to a loss function and keeps only
what that function returns as metrics; a forward-only pass that needs a tensor per
microbatch (not a loss) collects it through the loss function instead. This module is
that one pattern, written once.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, TypeVar

import torch

from megatron_opd.pipeline.microbatch import Microbatch
from megatron_opd.pipeline.schedule import run_microbatches

T = TypeVar("T")

# keep(index of the microbatch, the microbatch on the device, last-stage hidden states [s(/tp), b, H]) -> value
Keep = Callable[[int, Microbatch, torch.Tensor], T]


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` in eval mode (no dropout) for the duration, then back in the mode it was in.
    A model already in eval mode (a frozen teacher) is left alone: `train()` / `eval()` walk
    every submodule, a cost paid on each teacher forward of every step."""
    if not model.training:
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        model.train()


@torch.no_grad()
def collect_forward_only(model: torch.nn.Module, microbatches: list[Microbatch], keep: Keep[T]
                         ) -> Optional[list[T]]:
    """`keep(...)` of every microbatch, in order, on the last pipeline stage (None elsewhere);
    the model runs in eval mode without gradient through Megatron's schedule (so under PP the
    stages exchange activations as in training)."""
    kept: list = [None] * len(microbatches)

    def loss(index: int, batch: Microbatch, hidden: torch.Tensor):
        kept[index] = keep(index, batch, hidden)
        return hidden.new_zeros(()), {}

    with eval_mode(model):
        result = run_microbatches(model, microbatches, loss, forward_only=True)
    return kept if result is not None else None
