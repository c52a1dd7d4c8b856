"""An in-process teacher must share the run's tokenizer: checked at start, by `resolve_models`
(so for training and for `megatron-opd cache-teacher`), against the teacher's own tokenizer
files. Each kind of mismatch is a real tokenizer saved as HF saves it
(`tests.hf_models.make_tokenizer_variant`); the allowed case is the Qwen2.5 one, one
tokenizer over models whose config vocab sizes differ (152064 / 151936, here 400 / 320
over a 300-token tokenizer). Also here: a teacher whose heads TP does not divide.
No ranks are started: the checks run before the runtime is.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from megatron_opd.checkpoint.run_models import resolve_models
from megatron_opd.config.job import load_job_config
from megatron_opd.config.schema import ConfigError
from tests.gkd_setup import make_gkd_setup, overrides
from tests.hf_models import VOCAB, make_hf_model, make_tokenizer, make_tokenizer_variant

STUDENT_VOCAB, TEACHER_VOCAB = 320, 400  # both pad the 300-token tokenizer, unequally


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("teacher_tokenizer")
    setup = make_gkd_setup(root, teacher_family="llama2", student_fields={"vocab_size": STUDENT_VOCAB},
                           teacher_fields={"vocab_size": TEACHER_VOCAB})
    setup["root"] = root
    return setup


def teacher_with(setup: dict, name: str, **variant) -> str:
    """The setup's teacher weights with a tokenizer beside them: the run's own (no `variant`)
    or `make_tokenizer_variant(**variant)`. A Llama directory: transformers loads the saved
    word-level tokenizer there (next to a Qwen2 config.json it would load Qwen2Tokenizer)."""
    directory = Path(setup["root"]) / name
    if not directory.exists():
        shutil.copytree(setup["teacher"], directory)
        if variant:
            make_tokenizer_variant(directory, **variant)
        else:
            make_tokenizer(directory)
    return str(directory)


def config_of(setup: dict, tmp_path: Path, **fields):
    return load_job_config(None, overrides(setup, tmp_path / "out", **fields))


def test_same_tokenizer_over_unequal_vocab_sizes_is_accepted(setup, tmp_path):
    """The 152064 / 151936 case: one padded vocab for both heads, ids >= the tokenizer's length masked."""
    teacher = teacher_with(setup, "same_tokenizer")
    for tp in (1, 2):
        models = resolve_models(config_of(setup, tmp_path, teacher_model=teacher,
                                          **{"parallel.tensor_model_parallel_size": tp}))
        assert models.vocab_size == len(models.tokenizer) == VOCAB
        assert (models.student.model.vocab_size, models.teacher.model.vocab_size) == (STUDENT_VOCAB, TEACHER_VOCAB)
        padded = {source.model.padded_vocab_size(tp) for source in (models.student, models.teacher)}
        assert padded == {512}, padded  # 400 rounded up to 128 * tp, the larger of the two


def test_teacher_declaring_another_eos_over_the_same_vocab_is_accepted(setup, tmp_path):
    """An instruct teacher ends turns on another token of the same vocab than its base student:
    not a different tokenizer (the run samples with the run's tokenizer's EOS)."""
    teacher = teacher_with(setup, "other_eos", eos_token="w298")
    assert resolve_models(config_of(setup, tmp_path, teacher_model=teacher)).vocab_size == VOCAB


def test_teacher_without_tokenizer_files_is_not_checked(setup, tmp_path):
    assert not any(Path(setup["teacher"]).glob("tokenizer*"))
    assert resolve_models(config_of(setup, tmp_path)).teacher is not None


MISMATCHES = {
    "other_ids": ({"id_step": 7}, r"token 'w1' is id 1 in the student's tokenizer, id 7 in the teacher's"),
    "other_size": ({"words": VOCAB - 11}, rf"the student's tokenizer has {VOCAB} tokens, the teacher's {VOCAB - 10}"),
    "other_pre_tokenizer": ({"split_punctuation": False},
                            (r"a probe text \('Distillation probe: .*\) is \d+ ids in the student's tokenizer, \d+ "
                             r"in the teacher's, first differing at position \d+")),
}


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_teacher_of_another_tokenizer_is_refused_naming_both(setup, tmp_path, name):
    variant, difference = MISMATCHES[name]
    teacher = teacher_with(setup, name, **variant)
    with pytest.raises(ConfigError) as error:
        resolve_models(config_of(setup, tmp_path, teacher_model=teacher))
    message = str(error.value)
    assert message.startswith(f"teacher_model={teacher} is invalid: its tokenizer ({teacher}) differs from the "
                              f"run's, data.tokenizer={setup['tokenizer']}: "), message
    assert re.search(difference, message), message


def test_the_students_own_tokenizer_is_compared_without_data_tokenizer(setup, tmp_path):
    """Without data.tokenizer the run's tokenizer is the student's (a Llama directory here, so
    transformers loads its word-level files); the error names the student then."""
    student = Path(setup["root"]) / "llama_student"
    if not student.exists():
        make_hf_model("llama2", student, seed=3, vocab_size=STUDENT_VOCAB, num_hidden_layers=2)
        make_tokenizer(student)
    fields = {"model": str(student), "data.tokenizer": "null"}
    assert resolve_models(config_of(setup, tmp_path, teacher_model=teacher_with(setup, "same_tokenizer"),
                                    **fields)).vocab_size == VOCAB
    teacher = teacher_with(setup, "other_ids", id_step=7)
    with pytest.raises(ConfigError, match=re.escape(f"differs from the run's, model={student} (its tokenizer): "
                                                    "token 'w1' is id 1")):
        resolve_models(config_of(setup, tmp_path, teacher_model=teacher, **fields))


def test_cache_teacher_refuses_a_teacher_of_another_tokenizer(setup, tmp_path):
    from megatron_opd.commands.cache_teacher import write_cache

    teacher = teacher_with(setup, "other_ids", id_step=7)
    config = config_of(setup, tmp_path, teacher_model=teacher, gkd_logits_topk=4)
    with pytest.raises(ConfigError, match=r"its tokenizer .* differs from the run's"):
        write_cache(config, tmp_path / "cache", force=False)
    assert not (tmp_path / "cache").exists()


def test_teacher_heads_that_tp_does_not_divide_are_refused(tmp_path):
    """A teacher with 6 heads at TP=4 (its student, 4 heads and 4 KV heads, splits): refused
    with the teacher's path, its head count and the TP size."""
    student = make_hf_model("llama2", tmp_path / "student", seed=1, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=4)
    teacher = make_hf_model("llama2", tmp_path / "teacher", seed=2, num_hidden_layers=1, hidden_size=96,
                            head_dim=16, num_attention_heads=6, num_key_value_heads=2, intermediate_size=256)
    make_tokenizer(tmp_path / "tokenizer")
    setup = {"student": str(student), "teacher": str(teacher), "tokenizer": str(tmp_path / "tokenizer"),
             "train": "unused.jsonl", "val": "unused.jsonl"}
    config = config_of(setup, tmp_path, **{"parallel.tensor_model_parallel_size": 4})
    expected = (f"teacher_model {teacher}: model.num_attention_heads=6 is invalid: a multiple of "
                "parallel.tensor_model_parallel_size=4")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        resolve_models(config)


def convert_on_rank(argv: list[str]) -> int:
    from megatron_opd.commands import convert

    return convert.main(argv)


def test_checkpoint_teacher_is_checked_by_its_hf_tokenizer(setup, tmp_path):
    """A megatron_opd checkpoint keeps its tokenizer in hf/: a teacher converted from a
    directory of another tokenizer is refused by it."""
    from megatron_opd.testing import run_distributed

    checkpoint = tmp_path / "teacher_checkpoint"
    argv = ["hf-to-megatron", "--hf-path", teacher_with(setup, "other_ids", id_step=7), "--out", str(checkpoint)]
    assert run_distributed(convert_on_rank, 1, argv, timeout=300) == [0]
    with pytest.raises(ConfigError, match=re.escape(f"teacher_model={checkpoint} is invalid: its tokenizer "
                                                    f"({checkpoint / 'hf'}) differs from the run's")):
        resolve_models(config_of(setup, tmp_path, teacher_model=str(checkpoint)))
