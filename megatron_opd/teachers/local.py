"""An in-process Megatron teacher, run forward-only over a step's microbatches before the student.

The last pipeline stage keeps, per microbatch, the teacher's final hidden states at
the response tokens only, `[N, H_T]` (N = the microbatch's loss-mask count, row-major),
and uses the teacher's LM-head shard inside the student's loss
(`ops.fused_linear_divergence`), so the teacher's `[b, s, V/tp]` logits never exist
for a whole microbatch: hidden states are V/H (about 40x for Qwen) smaller. Top-K
distillation computes the teacher's top-K from them in the loss, at the cost of one
chunked LM-head matmul, so one cache serves both.

Keeping response rows, not positions, is what lets the teacher read a different
prompt than the student (OPSD's `teacher_prompt`): the i-th response token of the
teacher's sequence and of the student's are the same token whatever the prompts'
lengths, so `[N, H_T]` lines up with the student's `hidden[loss_mask]`.

The teacher is a frozen model of its own, or (OPSD, dynamic) the student itself:
then its forward runs on the student's current weights, without gradient.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state

from megatron_opd.models.offload import WeightOffload
from megatron_opd.models.outputs import head_input, lm_head_weight
from megatron_opd.pipeline import Microbatch, collect_forward_only, eval_mode
from megatron_opd.teachers.outputs import TeacherHidden


class LocalTeacher:
    """A frozen Megatron `GPTModel` with the student's TP/PP layout, or the student itself.

    `offload`: keep the weights in host memory between forwards (`models.offload`); the
    LM-head shard stays on the device, since the student's loss needs it after the teacher
    pass. In CPU mode the same mechanism runs (device tensors released and re-made), so it
    is tested here; it saves memory only on GPU.
    `is_student`: `model` is the student being trained (OPSD's dynamic teacher).
    """

    def __init__(self, model: torch.nn.Module, offload: bool = False, is_student: bool = False):
        if not is_student and any(param.requires_grad for param in model.parameters()):
            raise ValueError("the teacher must be frozen: build it with role='teacher'")
        if is_student and offload:
            raise ValueError("offload is invalid for the student's own weights (teacher: self, dynamic)")
        self.model = model
        self.is_student = is_student
        self.offload: Optional[WeightOffload] = None
        if offload:
            head = [lm_head_weight(model)] if parallel_state.is_pipeline_last_stage() else []
            self.offload = WeightOffload(model, keep=head)

    @contextmanager
    def on_device(self) -> Iterator[torch.nn.Module]:
        """The model with its weights on the device for the duration (loaded back when
        offloaded), in eval mode."""
        with self.offload.on_device() if self.offload is not None else nullcontext():
            with eval_mode(self.model):
                yield self.model

    @torch.no_grad()
    def forward(self, microbatches: list[Microbatch], examples: Optional[list] = None
                ) -> Optional[list[TeacherHidden]]:
        """The teacher's output per microbatch on the last stage, None elsewhere.

        `microbatches`: the teacher's own inputs (e.g. teacher_prompt + response), whose
        loss masks count the same response tokens, row by row, as the student's.
        """
        def keep(index: int, batch: Microbatch, hidden: torch.Tensor) -> TeacherHidden:
            head = lm_head_weight(self.model).detach()
            return TeacherHidden(head_input(self.model, hidden).detach()[batch.loss_mask], head)

        # A frozen teacher's forward needs no autograd bookkeeping at all (version counters, view
        # tracking): inference mode, 7% of the quickstart teacher's forward. Not for the student
        # itself (OPSD's dynamic teacher): its modules cache tensors across forwards (Megatron's
        # rotary frequencies, an lru_cache), and an inference tensor reaching its training
        # forward fails wherever autograd must save it.
        with self.on_device(), torch.inference_mode(not self.is_student):
            return collect_forward_only(self.model, microbatches, keep)
