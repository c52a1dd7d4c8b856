"""The run's teachers as sources: servers and caches built before any model loads (a server that
is down or a cache of other data fails in seconds), in-process ones wrapped once loaded, and
the `TeacherSet` over all of them in config order."""

from __future__ import annotations

from typing import Any, Optional

from megatron_opd.checkpoint.run_models import RunModels
from megatron_opd.config.job import SINGLE_TEACHER, JobConfig, TeacherConfig
from megatron_opd.runtime import Runtime
from megatron_opd.teachers.cache import TeacherCache
from megatron_opd.teachers.routing import Member, TeacherSet
from megatron_opd.teachers.server import ServerTeacher


def remote_source(config: JobConfig, spec: TeacherConfig, models: RunModels, runtime: Runtime):
    """`ServerTeacher` for a server teacher, `TeacherCache` for a cache one, else None."""
    topk = config.teacher_topk(spec)
    if spec.server is not None:
        return ServerTeacher(spec.server, config.teacher_server_settings(spec), topk or 1, models.vocab_size,
                             models.tokenizer, runtime.device)
    if spec.cache is not None:
        return TeacherCache(spec.cache, topk, models.vocab_size, runtime.device)
    return None


def remote_teachers(config: JobConfig, models: RunModels, runtime: Runtime) -> dict[str, Any]:
    """The server and cache teachers by name (connected / opened now)."""
    found = {}
    for spec in config.teacher_list():
        source = remote_source(config, spec, models, runtime)
        if source is not None:
            found[spec.name] = source
    return found


def teacher_set(config: JobConfig, sources: dict[str, Any], self_teacher: Any = None) -> Optional[TeacherSet]:
    """The run's teachers in config order (`sources`: each teacher's source by name), or
    `self_teacher` (OPSD's dynamic teacher, the student) as a set of one; None without a teacher."""
    specs = config.teacher_list()
    if not specs:
        if self_teacher is None:
            return None
        return TeacherSet([Member(SINGLE_TEACHER, self_teacher, config.temperature, config.gkd_logits_topk)])
    return TeacherSet([Member(spec.name, sources[spec.name], config.teacher_temperature(spec),
                              config.teacher_topk(spec)) for spec in specs])
