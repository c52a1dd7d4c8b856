"""Rules on a job config that need the file system (the rest are checked at load, in `config.job`)."""

from __future__ import annotations

from pathlib import Path

from megatron_opd.config.job import JobConfig
from megatron_opd.config.schema import ConfigError


def check_teacher_paths(config: JobConfig) -> None:
    """A fixed OPSD self-teacher must be the student's own path (resolved), naming the field."""
    if config.teacher == "self" and config.teacher_model is not None:
        if Path(config.teacher_model).resolve() != Path(config.model).resolve():
            raise ConfigError(f"teacher_model={config.teacher_model!r} is invalid with teacher: self: a fixed "
                              f"self-teacher is the student's own initial weights (model={config.model!r}); "
                              "leave it null for the dynamic teacher, or use teacher: model for another model")
