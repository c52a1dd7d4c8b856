"""OPSD: the teacher reads each row's privileged `teacher_prompt` in place of the student's prompt.

On-policy self-distillation feeds the teacher (the student itself, or a frozen copy of
its initial weights) `teacher_prompt + response` while the student sees
`prompt + response`; the divergence (GKD) or log-ratio (OPD-RL) is taken on the
response tokens, which the two sequences share at different positions. The teacher's
hidden states are kept at its loss-mask rows (`teachers.local`), which line up with the
student's row for row, so the prompts may have any lengths. The teacher's view of a row
is `data.teacher_example`.
"""

from __future__ import annotations

from megatron_opd.config.schema import ConfigError


def check_teacher_prompts(teacher_prompt_ids: list, split: str) -> None:
    """`teacher: self` without a privileged prompt would distill the student into itself
    (a zero signal): every row must have one."""
    missing = [row for row, ids in enumerate(teacher_prompt_ids) if ids is None]
    if missing:
        raise ConfigError(f"teacher=self needs a teacher_prompt in every row: {len(missing)} of "
                          f"{len(teacher_prompt_ids)} {split} rows have none (first: row {missing[0]}); "
                          "add the column, or use teacher: model")
