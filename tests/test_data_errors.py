"""Bad data gives one clear line: a UserError naming the file, the row or line, the field
and what to do (the commands print a UserError without a traceback).

The data layer is called as the trainer calls it (`build_dataset`, under
`tokenized_split`); the tokenizer is test_data's word-level one ("w10" is id 10).
"""

from __future__ import annotations

import json
import pickle

import datasets
import pytest

from megatron_opd.config.data import DataConfig
from megatron_opd.config.errors import UserError
from megatron_opd.data import DataError, DataFileError, MissingDataFileError, TemplateError, build_dataset
from tests.test_data import make_tokenizer, write_jsonl

GOOD = {"prompt": "w10 w11", "completion": "w12"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def build(tmp_path, tokenizer, path, split="train", **options):
    key = "dataset" if split == "train" else "val_dataset"
    extra = {"dataset": [write_jsonl(tmp_path / "good.jsonl", [GOOD])]} if split == "val" else {}
    config = DataConfig(**extra, **{key: [str(path)]}, **options)
    return build_dataset(config, tokenizer, split=split, cache_dir=str(tmp_path / "cache"))


def user_error(tmp_path, tokenizer, path, kind=DataFileError, **options) -> str:
    """The one-line message of the UserError that building `path` raises."""
    with pytest.raises(UserError) as caught:
        build(tmp_path, tokenizer, path, **options)
    assert isinstance(caught.value, kind), repr(caught.value)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    return message


# --------------------------------------------------------------------------- 1. not UTF-8

@pytest.mark.parametrize("split", ["train", "val"])
def test_latin1_jsonl_names_the_byte_and_line(tmp_path, tokenizer, split):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(((json.dumps(GOOD) + "\n") * 3 + '{"prompt": "caf\xe9 w10", "completion": "w12"}\n')
                     .encode("latin-1"))
    message = user_error(tmp_path, tokenizer, path, split=split)
    offset = 3 * len(json.dumps(GOOD) + "\n") + len('{"prompt": "caf')
    assert message == (f"{path}: not UTF-8 text: byte 0xe9 at line 4 (byte 16 of the line, offset {offset} in "
                       "the file); re-save the file as UTF-8")


def test_not_utf8_in_a_column_the_tokenizer_never_reads(tmp_path, tokenizer):
    # pyarrow stores the bytes as they are; a reward function would trip on them much later.
    path = tmp_path / "answers.json"
    path.write_bytes(f'[{json.dumps(GOOD)},\n{{"prompt": "w10", "completion": "w11", "answer": "\xe9"}}]'
                     .encode("latin-1"))
    assert "not UTF-8 text: byte 0xe9 at line 2" in user_error(tmp_path, tokenizer, path)


def test_utf16_file(tmp_path, tokenizer):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode("utf-16"))
    assert "is UTF-16 (or UTF-32) text, not UTF-8; re-save the file as UTF-8" in user_error(tmp_path, tokenizer, path)


# --------------------------------------------------------------------------- 2. no rows

@pytest.mark.parametrize("name, content, why", [
    ("empty.jsonl", "", "the file is empty"),
    ("blank.jsonl", "\n \n", "the file has only blank lines"),
    ("empty.json", "[]", "an empty JSON array"),
])
def test_file_without_rows(tmp_path, tokenizer, name, content, why):
    path = tmp_path / name
    path.write_text(content)
    message = user_error(tmp_path, tokenizer, path)
    assert message == f"{path}: has no rows ({why}); add rows or remove it from the data config"


def test_parquet_without_rows(tmp_path, tokenizer):
    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"prompt": [], "completion": []}).to_parquet(str(path))
    assert user_error(tmp_path, tokenizer, path) == f"{path}: has no rows; add rows or remove it from the data config"


# --------------------------------------------------------------------------- 3. wrong columns

@pytest.mark.parametrize("skip_bad_rows", [False, True])
def test_rows_without_messages_or_prompt_name_the_columns(tmp_path, tokenizer, skip_bad_rows):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "w10", "answer": "w11"}] * 2)
    message = user_error(tmp_path, tokenizer, path, skip_bad_rows=skip_bad_rows)
    assert message == (f"{path}: no usable rows: its columns are ['question', 'answer'], but each row needs "
                       "'messages' (a list of {role, content} messages) or 'prompt' and 'completion'; rename the "
                       "columns (data.skip_bad_rows would skip every row)")


def test_no_usable_rows_left_is_a_user_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "w10 " * 10, "completion": "w11"}])
    message = user_error(tmp_path, tokenizer, path, prompt_format="raw", max_length=5, truncation_strategy="delete")
    assert "no usable rows in data.dataset: 1 rows read, 0 kept" in message
    assert f"first: {path} row 0: 10 prompt + 2 response tokens exceed data.max_length=5 [too_long]" in message
    assert "data.truncation_strategy, data.max_length" in message


# --------------------------------------------------------------------------- 4. wrong types

@pytest.mark.parametrize("num_proc", [1, 2])  # 2: the error comes back pickled from a worker
def test_int_completion_names_row_field_type_and_fix(tmp_path, tokenizer, num_proc):
    path = write_jsonl(tmp_path / "int.jsonl", [GOOD, GOOD, {"prompt": "hi", "completion": 3}])
    message = user_error(tmp_path, tokenizer, path, kind=DataError, num_proc=num_proc)
    assert message == (f"{path} row 2: completion must be a string or a list of {{role, content}} messages, "
                       'got int 3; write it as a JSON string: "3" [bad_type]')


def test_single_message_not_in_a_list(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "dict.jsonl", [{"prompt": "w10", "completion": {"role": "assistant",
                                                                                  "content": "w11"}}])
    message = user_error(tmp_path, tokenizer, path, kind=DataError)
    assert message.startswith(f"{path} row 0: completion must be a string or a list of {{role, content}} "
                              "messages, got dict {'role': 'assistant', 'content': 'w11'}; put a single message "
                              'in a list: [{"role": ..., "content": ...}]')


# --------------------------------------------------------------------------- 5. too long

def test_prompt_longer_than_max_length_says_which_setting_to_change(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [GOOD, {"prompt": "w10 " * 10, "completion": "w11"}])
    message = user_error(tmp_path, tokenizer, path, kind=DataError, prompt_format="raw", max_length=5)
    assert message == (f"{path} row 1: the prompt alone has 10 tokens, leaving no room for the response in "
                       "data.max_length=5 (with data.truncation_strategy='right', which cuts only the response); "
                       "raise data.max_length to 12 to keep the whole row, or set data.truncation_strategy='left' "
                       "(cut the prompt's start) or 'delete' (drop such rows), or data.skip_bad_rows=true (skip "
                       "them) [fully_truncated]")
    # Each piece of advice works.
    whole, _ = build(tmp_path, tokenizer, path, prompt_format="raw", max_length=12)
    assert len(whole[1]["input_ids"]) == 12
    for options in ({"truncation_strategy": "left"}, {"truncation_strategy": "delete"}, {"skip_bad_rows": True}):
        assert len(build(tmp_path, tokenizer, path, prompt_format="raw", max_length=5, **options)[0]) >= 1


def test_teacher_prompt_longer_than_max_length_is_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "teacher.jsonl", [{**GOOD, "teacher_prompt": "w30 " * 8}])
    message = user_error(tmp_path, tokenizer, path, kind=DataError, prompt_format="raw", max_length=8)
    assert message.startswith(f"{path} row 0: the teacher_prompt alone has 8 tokens")
    assert "raise data.max_length to 10" in message


# --------------------------------------------------------------------------- 6. file types

@pytest.mark.parametrize("name", ["rows.txt", "rows"])
def test_unknown_file_type_names_the_allowed_ones(tmp_path, tokenizer, name):
    path = tmp_path / name
    path.write_text("w10 w11\n")
    message = user_error(tmp_path, tokenizer, path)
    kind = "'.txt'" if name.endswith(".txt") else "(no extension)"
    assert message.startswith(f"{path}: unknown type {kind}: expected a .jsonl, .json or .parquet file, or a "
                              "directory written by datasets' save_to_disk; convert it, e.g. to JSON lines")


def test_missing_file_is_a_user_error_and_a_file_not_found_error(tmp_path, tokenizer):
    path = tmp_path / "nope.jsonl"
    message = user_error(tmp_path, tokenizer, path, kind=MissingDataFileError)
    assert isinstance(pickle.loads(pickle.dumps(MissingDataFileError(str(path), "x"))), FileNotFoundError)
    assert message == f"{path}: data file does not exist; check the path in data.dataset / data.val_dataset"


# --------------------------------------------------------------------------- JSON structure

@pytest.mark.parametrize("name, content, expected", [
    ("numbers.json", "[1, 2, 3]", "row 0 of the JSON array is a number (1), not a JSON object"),
    ("strings.json", '["w10", "w11"]', 'row 0 of the JSON array is a string ("w10"), not a JSON object'),
    ("mixed.jsonl", json.dumps(GOOD) + "\n[1, 2]\n", "line 2 is an array ([1, 2]), not a JSON object"),
    ("strings.jsonl", '"w10"\n', 'line 1 is a string ("w10"), not a JSON object'),
    ("empty_objects.jsonl", "{}\n{}\n", "has no columns: every row is an empty object {}"),
])
def test_rows_that_are_not_objects(tmp_path, tokenizer, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    message = user_error(tmp_path, tokenizer, path)
    assert message.startswith(f"{path}: {expected}") and '{"prompt": ..., "completion": ...}' in message


@pytest.mark.parametrize("name, content, expected", [
    ("syntax.jsonl", f"{json.dumps(GOOD)}\n{json.dumps(GOOD)}\n" + '{"prompt": "w10" "completion": "w11"}\n',
     "line 3, column 18: invalid JSON (Expecting ',' delimiter); each line of a JSON lines file must be one "
     "complete JSON object"),
    ("syntax.json", f"[{json.dumps(GOOD)},\n" + '{"prompt": "w10", completion: "w11"}]\n',
     "line 2, column 19: invalid JSON (Expecting property name enclosed in double quotes)"),
])
def test_json_syntax_error_names_the_line(tmp_path, tokenizer, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    assert user_error(tmp_path, tokenizer, path) == f"{path}: {expected}"


def test_a_pretty_printed_object_is_not_called_invalid(tmp_path, tokenizer):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"text": "w10"}, indent=2))  # valid JSON, just not a usable row
    assert "its columns are ['text']" in user_error(tmp_path, tokenizer, path)


# --------------------------------------------------------------------------- parquet and directories

def test_corrupt_parquet(tmp_path, tokenizer, caplog):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    message = user_error(tmp_path, tokenizer, path)
    assert message.startswith(f"{path}: not a readable parquet file (ArrowInvalid: ")
    assert message.endswith("; write it again, e.g. with datasets' to_parquet or pandas' DataFrame.to_parquet")
    assert "Failed to read schema" not in caplog.text  # the footer is read first: no log line from datasets


def test_directories(tmp_path, tokenizer):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "rows.jsonl").write_text(json.dumps(GOOD) + "\n")
    assert user_error(tmp_path, tokenizer, plain).startswith(f"{plain}: this directory is not a saved dataset")
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(splits))
    assert user_error(tmp_path, tokenizer, splits) == (
        f"{splits}: this directory holds a DatasetDict with splits ['train']: give one split's directory, "
        f"e.g. '{splits / 'train'}'")


def test_reserved_columns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "taken.jsonl", [{**GOOD, "input_ids": [1, 2]}])
    assert user_error(tmp_path, tokenizer, path) == (
        f"{path}: has column(s) ['input_ids'], which tokenization writes; rename or drop them")


def test_data_errors_are_user_errors_that_pickle():
    for error in (DataError("a.jsonl", 3, "bad_type", "x"), DataFileError("a.jsonl", "x"),
                  MissingDataFileError("a.jsonl", "x"), TemplateError("a.jsonl row 0: x")):
        copy = pickle.loads(pickle.dumps(error))
        assert isinstance(copy, UserError) and type(copy) is type(error) and str(copy) == str(error)
