"""The teacher a job names, when it is not a model in this process: a server or the teacher cache."""

from __future__ import annotations

from megatron_opd.checkpoint.run_models import RunModels
from megatron_opd.config.job import JobConfig
from megatron_opd.runtime import Runtime
from megatron_opd.teachers.cache import TeacherCache
from megatron_opd.teachers.server import ServerTeacher


def remote_teacher(config: JobConfig, models: RunModels, runtime: Runtime):
    """`ServerTeacher` for `teacher_model_server`, `TeacherCache` for `teacher_cache`, else None.
    Built before any model loads, so a server that is down or a cache of other data fails in seconds."""
    if config.teacher_model_server is not None:
        return ServerTeacher(config.teacher_model_server, config.teacher_server, config.gkd_logits_topk or 1,
                             models.vocab_size, models.tokenizer, runtime.device)
    if config.teacher_cache is not None:
        return TeacherCache(config.teacher_cache, config.gkd_logits_topk, models.vocab_size, runtime.device)
    return None
