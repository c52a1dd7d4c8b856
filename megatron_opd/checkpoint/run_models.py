"""A job's models as found on disk, before any weights load: the student, an in-process teacher,
one padded vocab for both, and the tokenizer (shared by training and `cache-teacher`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from megatron_opd.checkpoint.pretrained import Pretrained, inspect_pretrained
from megatron_opd.config.job import JobConfig
from megatron_opd.config.model import with_common_padded_vocab
from megatron_opd.config.schema import ConfigError


@dataclass
class RunModels:
    """The run's models as found on disk (no weights loaded), with one padded vocab, and the tokenizer."""

    student: Pretrained
    teacher: Optional[Pretrained]  # an in-process teacher_model, else None
    vocab_size: int  # true vocab: ids >= it are padding in every head
    tokenizer: Any


def resolve_models(config: JobConfig) -> RunModels:
    """Inspect the student and teacher, check them against the layout, pad their vocabs to
    one size, and load the tokenizer (which must fit the vocab)."""
    student = inspect_pretrained(config.model, config.make_vocab_size_divisible_by)
    teacher = (inspect_pretrained(config.teacher_model, config.make_vocab_size_divisible_by)
               if config.teacher_model is not None else None)
    for name, source in (("model", student), ("teacher_model", teacher)):
        try:
            if source is not None:
                source.model.check_parallel(config.parallel)
        except ConfigError as error:
            raise ConfigError(f"{name} {source.path}: {error}") from error
    sources = [student] + ([teacher] if teacher is not None else [])
    padded = with_common_padded_vocab([source.model for source in sources],
                                      config.parallel.tensor_model_parallel_size)
    sources = [dataclasses.replace(source, model=model) for source, model in zip(sources, padded)]
    vocab_size = min(source.model.vocab_size for source in sources)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer or student.tokenizer_dir)
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"data.tokenizer has {len(tokenizer)} tokens, more than the models' vocab ({vocab_size}): "
                          "student and teacher must share the tokenizer")
    return RunModels(sources[0], sources[1] if teacher is not None else None, vocab_size, tokenizer)
