"""A job's models as found on disk, before any weights load: the student, the in-process teachers,
one padded vocab for all, and the tokenizer (shared by training and `cache-teacher`).

Teacher and student may differ in every dimension (layers, hidden size, heads, FFN, padded
vocab): the losses read the teacher through its own final hidden states and LM head. What
they must share is the tokenizer, since the teacher scores the student's token ids. An
in-process teacher that ships tokenizer files is compared with the run's tokenizer here,
so that a Qwen teacher for a Llama student fails at start instead of training on nonsense
(a teacher server is checked the same way by `teachers.server`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_opd.checkpoint.pretrained import Pretrained, inspect_pretrained
from megatron_opd.config.errors import UserError
from megatron_opd.config.job import JobConfig
from megatron_opd.config.model import with_common_padded_vocab
from megatron_opd.config.schema import ConfigError
from megatron_opd.data.tokenizer_match import tokenizer_difference

# Files any one of which makes a directory a tokenizer AutoTokenizer can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class RunModels:
    """The run's models as found on disk (no weights loaded), with one padded vocab, and the tokenizer."""

    student: Pretrained
    teachers: dict[str, Pretrained]  # the in-process teachers by name (config.teacher_list() order)
    vocab_size: int  # true vocab (the tokenizer's): ids >= it are padding in every head
    tokenizer: Any

    @property
    def teacher(self) -> Optional[Pretrained]:
        """The in-process teacher of a run whose only teacher is one, else None."""
        return next(iter(self.teachers.values())) if len(self.teachers) == 1 else None


def resolve_models(config: JobConfig) -> RunModels:
    """Inspect the student and teacher, check them against the layout, pad their vocabs to
    one size, load the tokenizer (which must fit every model's vocab) and check that the
    teacher's own tokenizer, if it ships one, is the same."""
    student = inspect_field("model", config.model, config.make_vocab_size_divisible_by)
    fields = teacher_model_fields(config)  # name -> (config field, path) of each in-process teacher
    teachers = {name: inspect_field(field, path, config.make_vocab_size_divisible_by)
                for name, (field, path) in fields.items()}
    for name, source in (("model", student), *((fields[key][0], value) for key, value in teachers.items())):
        try:
            source.model.check_parallel(config.parallel)
        except ConfigError as error:
            raise ConfigError(f"{name} {source.path}: {error}") from error
    check_expert_layout(config, student, teachers, fields)
    sources = [student, *teachers.values()]
    padded = with_common_padded_vocab([source.model for source in sources],
                                      config.parallel.tensor_model_parallel_size)
    sources = [dataclasses.replace(source, model=model) for source, model in zip(sources, padded)]

    tokenizer_path, tokenizer_field = run_tokenizer_path(config, student)
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = tokenizer_vocab_size(tokenizer, tokenizer_field, sources)
    teachers = dict(zip(teachers, sources[1:]))
    for name, teacher in teachers.items():
        check_teacher_tokenizer(tokenizer, tokenizer_path, tokenizer_field, teacher, fields[name][0])
    return RunModels(sources[0], teachers, vocab_size, tokenizer)


def check_expert_layout(config: JobConfig, student: Pretrained, teachers: dict[str, Pretrained],
                        fields: dict[str, tuple[str, str]]) -> None:
    """Expert parallelism that the run's models can use, checked at start rather than at the
    first step: some model must be a mixture of experts, and a MoE model that the Megatron
    sampler decodes (on-policy student, seq_kd teacher) must keep its experts within TP (an
    expert group holding other data-parallel ranks cannot gather their different sequences)."""
    parallel = config.parallel
    models = {"model": student, **{fields[name][0]: source for name, source in teachers.items()}}
    if parallel.expert_model_parallel_size > 1 and not any(source.model.is_moe for source in models.values()):
        raise ConfigError(f"parallel.expert_model_parallel_size={parallel.expert_model_parallel_size} is invalid: "
                          f"no model of this run is a mixture of experts ({', '.join(models)}); set it to 1")
    expert_ranks = parallel.expert_model_parallel_size * parallel.expert_tensor_size
    if expert_ranks <= parallel.tensor_model_parallel_size or config.rollout.engine != "megatron":
        return
    sampled = []
    if student.model.is_moe and (config.algorithm == "opd_rl" or (config.algorithm == "gkd" and config.lmbda > 0)):
        sampled.append("model (on-policy samples)")
    sampled += [f"{field} (seq_kd samples)" for field, source in models.items()
                if field != "model" and config.seq_kd and source.model.is_moe]
    if sampled:
        raise ConfigError(
            f"parallel.expert_model_parallel_size={parallel.expert_model_parallel_size} x expert_tensor_parallel_size="
            f"{parallel.expert_tensor_size} = {expert_ranks} ranks is invalid with tensor_model_parallel_size="
            f"{parallel.tensor_model_parallel_size} when the Megatron sampler decodes a mixture-of-experts model "
            f"({', '.join(sampled)}): keep the experts within TP (expert_tensor_parallel_size 1, "
            "expert_model_parallel_size <= tensor_model_parallel_size) or train off-policy (lmbda 0, no seq_kd)")


def teacher_model_fields(config: JobConfig) -> dict[str, tuple[str, str]]:
    """Each in-process teacher's name -> (the config field naming it, its path)."""
    if config.teachers:
        return {spec.name: (f"teachers[{index}].model", spec.model)
                for index, spec in enumerate(config.teachers) if spec.model is not None}
    return {spec.name: ("teacher_model", spec.model) for spec in config.teacher_list() if spec.model is not None}


def inspect_field(field: str, path: str, make_vocab_size_divisible_by: int) -> Pretrained:
    """`inspect_pretrained` of the config field `field`: what is wrong with the directory
    (missing, no config.json, corrupt weights, an unsupported model) raised as a ConfigError
    naming the field."""
    try:
        return inspect_pretrained(path, make_vocab_size_divisible_by)
    except (UserError, OSError) as error:
        raise ConfigError(f"{field}={path} is invalid: {error}") from error


def run_tokenizer_path(config: JobConfig, student: Pretrained) -> tuple[Path, str]:
    """The run's tokenizer and the field that names it: `data.tokenizer` when set, else the
    student's own (its directory, or a checkpoint's `hf/`)."""
    if config.data.tokenizer:
        return Path(config.data.tokenizer), f"data.tokenizer={config.data.tokenizer}"
    return student.tokenizer_dir, f"model={config.model} (its tokenizer)"


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_vocab_size(tokenizer: Any, field: str, sources: list[Pretrained]) -> int:
    """The true vocab: the tokenizer's length, which every model's `vocab_size` must hold.

    Models pad their embeddings past the tokenizer (Qwen2.5-0.5B 151936 rows, 7B 152064,
    for 151665 tokens): those rows are no token of the data, so ids >= len(tokenizer) are
    excluded in both heads and the student is trained on the teacher's real distribution.
    """
    smallest = min(sources, key=lambda source: source.model.vocab_size)
    if len(tokenizer) > smallest.model.vocab_size:
        raise ConfigError(f"{field} has {len(tokenizer)} tokens, more than the vocab_size="
                          f"{smallest.model.vocab_size} of {smallest.path}: student and teacher must share the "
                          "tokenizer, and every model must have at least its tokens")
    return len(tokenizer)


def has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def check_teacher_tokenizer(tokenizer: Any, tokenizer_path: Path, tokenizer_field: str, teacher: Pretrained,
                            field: str = "teacher_model") -> None:
    """Refuse an in-process teacher whose own tokenizer differs from the run's.

    The teacher scores the student's token ids, so the same id must mean the same text to
    both. A teacher directory without tokenizer files cannot be checked and is taken as is.
    Compared: the vocab (size, each special token's id, every token's id) and the ids of a
    probe text. Not compared: which token each side declares as EOS/BOS/pad (an instruct
    teacher ends turns on `<|im_end|>` where its base student ends on `<|endoftext|>`, both
    tokens of one vocab); the run samples with the run's tokenizer's EOS.
    """
    theirs_path = teacher.tokenizer_dir
    if not has_tokenizer_files(theirs_path) or _same_directory(theirs_path, tokenizer_path):
        return
    difference = tokenizer_difference(tokenizer, load_tokenizer(theirs_path))
    if difference is not None:
        raise ConfigError(
            f"{field}={teacher.path} is invalid: its tokenizer ({theirs_path}) differs from the run's, "
            f"{tokenizer_field}: {difference}. The teacher must use the student's tokenizer (a larger teacher "
            "vocab_size over the same tokenizer, e.g. 152064 vs 151936, is allowed)")


def _same_directory(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
