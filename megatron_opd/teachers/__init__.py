"""Teacher sources: what the distillation loss compares the student with."""

from megatron_opd.teachers.local import LocalTeacher, TeacherHidden

__all__ = ["LocalTeacher", "TeacherHidden"]
