"""Teacher sources: what the distillation loss compares the student with.

Each has `forward(microbatches, examples)` -> per microbatch, on the last pipeline stage,
the teacher's answer at the response tokens (`outputs.TeacherHidden` or
`outputs.TeacherTopK`), None on other stages; collective over the model-parallel ranks.
A run's teachers (one or several, rows routed by a data column) are a `routing.TeacherSet`,
whose answer per microbatch is a `outputs.TeacherMix` over them.
"""

from typing import Union

from megatron_opd.teachers.cache import TeacherCache
from megatron_opd.teachers.local import LocalTeacher
from megatron_opd.teachers.outputs import TeacherHidden, TeacherMix, TeacherOutput, TeacherPart, TeacherTopK
from megatron_opd.teachers.routing import TeacherSet
from megatron_opd.teachers.server import ServerTeacher, TeacherServerError

TeacherSource = Union[LocalTeacher, ServerTeacher, TeacherCache]

__all__ = ["LocalTeacher", "ServerTeacher", "TeacherCache", "TeacherHidden", "TeacherMix", "TeacherOutput",
           "TeacherPart", "TeacherServerError", "TeacherSet", "TeacherSource", "TeacherTopK"]
