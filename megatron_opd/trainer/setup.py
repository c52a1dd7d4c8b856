"""What a run needs before its models are built: the models on disk, the tokenizer, the data, a
remote teacher; shared by the trainer and `megatron-opd cache-teacher`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_opd.checkpoint.pretrained import Pretrained, inspect_pretrained
from megatron_opd.config.model import with_common_padded_vocab
from megatron_opd.config.schema import ConfigError
from megatron_opd.config.train import TrainConfig
from megatron_opd.data import build_dataset, collate
from megatron_opd.runtime.distributed import Runtime
from megatron_opd.teachers import ServerTeacher, TeacherCache, TeacherSource
from megatron_opd.trainer.schedule import Microbatch


@dataclass
class RunModels:
    """The run's models as found on disk (no weights loaded), with one padded vocab, and the tokenizer."""

    student: Pretrained
    teacher: Optional[Pretrained]  # an in-process teacher_model, else None
    vocab_size: int  # true vocab: ids >= it are padding in every head
    tokenizer: Any


def resolve_models(config: TrainConfig) -> RunModels:
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


def remote_teacher(config: TrainConfig, models: RunModels, runtime: Runtime) -> Optional[TeacherSource]:
    """The teacher when it is not a model in this process: a server or the teacher cache."""
    if config.teacher_model_server is not None:
        return ServerTeacher(config.teacher_model_server, config.teacher_server, config.gkd_logits_topk or 1,
                             models.vocab_size, models.tokenizer, runtime.device)
    if config.teacher_cache is not None:
        return TeacherCache(config.teacher_cache, config.gkd_logits_topk, models.vocab_size, runtime.device)
    return None


def tokenized_split(config: TrainConfig, tokenizer, split: str, rank: int):
    """`build_dataset` for `split`: rank 0 tokenizes first (filling the datasets cache), the
    others then read it."""
    if rank != 0:
        torch.distributed.barrier()
    dataset, stats = build_dataset(config.data, tokenizer, split)
    if rank == 0:
        print(f"data ({split}): {stats.summary()}", flush=True)
        torch.distributed.barrier()
    return dataset


def make_microbatches(examples: list[dict], pad_id: int, config: TrainConfig) -> list[Microbatch]:
    """`examples` padded to their longest sequence (a multiple of 8, and of TP under
    sequence parallelism) and split into microbatches of `training.micro_batch_size`."""
    parallel = config.parallel
    multiple = 8 * (parallel.tensor_model_parallel_size if parallel.sequence_parallel else 1)
    batch = collate(examples, pad_id, pad_to_multiple_of=multiple)
    tokens, loss_mask = batch["tokens"], batch["loss_mask"].bool()
    size = config.training.micro_batch_size
    return [Microbatch(tokens[start:start + size], loss_mask[start:start + size])
            for start in range(0, len(examples), size)]
