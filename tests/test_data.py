"""The data pipeline against hand-computed token ids.

The tokenizer is word-level: special tokens <pad>=0 <unk>=1 <|end|>=2 (EOS) <|user|>=3
<|assistant|>=4 <|system|>=5 <|sep|>=6, and words "w10".."w99" with the id in their
name, so "w10 w11" is [10, 11]. Its chat template renders a turn as
"<|role|> content <|end|> " and the generation prompt as "<|assistant|> ".
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from megatron_opd.config import ConfigError, from_dict
from megatron_opd.config.data import DataConfig
from megatron_opd.data import (DataError, DataIterator, TemplateError, build_dataset, collate, load_rows,
                               local_batch, pad_token_id, teacher_example)

PAD, EOS, USER, ASSISTANT, SYSTEM, SEP = 0, 2, 3, 4, 5, 6
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer(directory: Path, chat_template: str | None = TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|sep|>"]
    vocab = {token: i for i, token in enumerate(special)} | {f"w{i}": i for i in range(10, 100)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|end|>", additional_special_tokens=special[3:])
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def build(tmp_path, tokenizer, rows=None, files=None, split="train", **options):
    """build_dataset over `rows` written to one JSONL file (or over `files`)."""
    if files is None:
        files = [write_jsonl(tmp_path / "train.jsonl", rows)]
    key = "dataset" if split == "train" else "val_dataset"
    config = DataConfig(**({"dataset": ["unused.jsonl"]} if split != "train" else {}), **{key: files}, **options)
    return build_dataset(config, tokenizer, split=split, cache_dir=str(tmp_path / "cache"))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


SIMPLE = {"prompt": "w10 w11", "completion": "w12"}


# --------------------------------------------------------------------------- row formats

def test_multi_turn_messages_mask_exactly_the_assistant_turns(tmp_path, tokenizer):
    rows = [{"messages": [system("w20"), user("w10 w11"), assistant("w12 w13"), user("w14"), assistant("w15")],
             "answer": "w99", "id": 7}]
    dataset, stats = build(tmp_path, tokenizer, rows)
    row = dataset[0]
    assert row["input_ids"] == [SYSTEM, 20, EOS, USER, 10, 11, EOS, ASSISTANT, 12, 13, EOS,
                                USER, 14, EOS, ASSISTANT, 15, EOS]
    assert row["loss_mask"] == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    assert row["prompt_length"] == 8 and row["teacher_prompt_ids"] is None
    assert row["answer"] == "w99" and row["id"] == 7 and row["messages"][2] == assistant("w12 w13")
    assert (stats.rows_read, stats.rows_kept, stats.rows_truncated, stats.skipped) == (1, 1, 0, 0)


def test_prompt_completion_chat_and_raw(tmp_path, tokenizer):
    chat, _ = build(tmp_path, tokenizer, [SIMPLE])
    assert chat[0]["input_ids"] == [USER, 10, 11, EOS, ASSISTANT, 12, EOS]
    assert chat[0]["loss_mask"] == [0, 0, 0, 0, 0, 1, 1] and chat[0]["prompt_length"] == 5
    raw, _ = build(tmp_path, tokenizer, [SIMPLE], prompt_format="raw")
    assert raw[0]["input_ids"] == [10, 11, 12, EOS]  # no BOS, EOS appended
    assert raw[0]["loss_mask"] == [0, 0, 1, 1] and raw[0]["prompt_length"] == 2


def test_message_list_prompt_completion_use_the_template_even_when_raw(tmp_path, tokenizer):
    rows = [{"prompt": [system("w20"), user("w10"), assistant("w11"), user("w12")], "completion": [assistant("w13")]},
            {"prompt": [user("w10")], "completion": "w14"}]
    dataset, _ = build(tmp_path, tokenizer, rows, prompt_format="raw")
    # The prompt's own assistant turn is context: only the completion counts.
    assert dataset[0]["input_ids"] == [SYSTEM, 20, EOS, USER, 10, EOS, ASSISTANT, 11, EOS, USER, 12, EOS,
                                       ASSISTANT, 13, EOS]
    assert dataset[0]["loss_mask"] == [0] * 13 + [1, 1] and dataset[0]["prompt_length"] == 13
    assert dataset[1]["input_ids"] == [USER, 10, EOS, ASSISTANT, 14, EOS]
    assert dataset[1]["loss_mask"] == [0, 0, 0, 0, 1, 1]


def test_teacher_prompt_replaces_the_last_user_message_or_the_raw_prompt(tmp_path, tokenizer):
    rows = [{"messages": [system("w20"), user("w10"), assistant("w12")], "teacher_prompt": "w30 w31"},
            {"prompt": "w10", "completion": "w12", "teacher_prompt": "w32"},
            {"prompt": "w10", "completion": "w12"}]
    chat, _ = build(tmp_path, tokenizer, rows)
    assert chat[0]["teacher_prompt_ids"] == [SYSTEM, 20, EOS, USER, 30, 31, EOS, ASSISTANT]
    assert chat[1]["teacher_prompt_ids"] == [USER, 32, EOS, ASSISTANT]
    assert chat[2]["teacher_prompt_ids"] is None
    raw, _ = build(tmp_path, tokenizer, rows[1:], prompt_format="raw")
    assert raw[0]["teacher_prompt_ids"] == [32] and raw[0]["input_ids"] == [10, 12, EOS]

    view = teacher_example(chat[0])
    assert view["input_ids"] == [SYSTEM, 20, EOS, USER, 30, 31, EOS, ASSISTANT, 12, EOS]
    assert view["loss_mask"] == [0] * 8 + [1, 1] and view["prompt_length"] == 8
    assert teacher_example(chat[2])["input_ids"] == chat[2]["input_ids"]


def test_tokens_after_the_closing_eos_are_not_response(tmp_path):
    # Like Qwen's "<|im_end|>\n": the template writes <|sep|> after every turn's EOS.
    tokenizer = make_tokenizer(tmp_path / "tok", TEMPLATE.replace("<|end|> {% endfor", "<|end|> <|sep|> {% endfor"))
    dataset, _ = build(tmp_path, tokenizer, [{"messages": [user("w10"), assistant("w12"), user("w13"),
                                                           assistant("w14")]}])
    assert dataset[0]["input_ids"] == [USER, 10, EOS, SEP, ASSISTANT, 12, EOS, SEP, USER, 13, EOS, SEP,
                                       ASSISTANT, 14, EOS, SEP]
    assert dataset[0]["loss_mask"] == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0]


CHATML = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{%- endif %}"
          "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_chatml_template_with_a_byte_level_bpe(tmp_path):
    """Qwen-style: a default system prompt, newlines as tokens, "\n" after <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["user\nHello there, how are you?\n", "assistant\nI am fine. 2+2=4\n\nThanks"] * 20,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    rows = [{"messages": [user("Hello there"), assistant("I am fine.\n\nThanks"), user("how are you?"),
                          assistant(" 2+2=4")]}]
    row = build(tmp_path, tokenizer, rows)[0][0]
    response = [token for token, counted in zip(row["input_ids"], row["loss_mask"]) if counted]
    assert tokenizer.decode(response) == "I am fine.\n\nThanks<|im_end|> 2+2=4<|im_end|>"
    assert tokenizer.decode(row["input_ids"][:row["prompt_length"]]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(row["input_ids"][-1:]) == "\n" and row["loss_mask"][-1] == 0


def test_prompt_only_rows_need_allow_prompt_only(tmp_path, tokenizer):
    rows = [{"messages": [system("w20"), user("w10")], "teacher_prompt": "w30"}, {"prompt": "w11"}]
    dataset, _ = build(tmp_path, tokenizer, rows, allow_prompt_only=True)
    assert dataset[0]["input_ids"] == [SYSTEM, 20, EOS, USER, 10, EOS, ASSISTANT]
    assert dataset[0]["loss_mask"] == [0] * 7 and dataset[0]["prompt_length"] == 7
    assert dataset[0]["teacher_prompt_ids"] == [SYSTEM, 20, EOS, USER, 30, EOS, ASSISTANT]
    assert dataset[1]["input_ids"] == [USER, 11, EOS, ASSISTANT]
    with pytest.raises(DataError, match=r"train\.jsonl row 0: .*allow_prompt_only.*\[empty_response\]"):
        build(tmp_path, tokenizer, rows)


# --------------------------------------------------------------------------- truncation

LONG = {"prompt": "w10 w11 w12 w13", "completion": "w20 w21 w22"}  # raw: 4 prompt + 4 response tokens
SHORT = {"prompt": "w10", "completion": "w20"}  # raw: [10, 20, EOS]


@pytest.mark.parametrize("strategy, max_length, ids, mask, prompt_length", [
    ("right", 6, [10, 11, 12, 13, 20, 21], [0, 0, 0, 0, 1, 1], 4),
    ("left", 6, [12, 13, 20, 21, 22, EOS], [0, 0, 1, 1, 1, 1], 2),  # response kept whole
    ("left", 3, [13, 20, 21], [0, 1, 1], 1),  # response alone too long: one prompt token, end cut
    ("right", 8, [10, 11, 12, 13, 20, 21, 22, EOS], [0, 0, 0, 0, 1, 1, 1, 1], 4),  # fits: untouched
])
def test_truncation(tmp_path, tokenizer, strategy, max_length, ids, mask, prompt_length):
    dataset, stats = build(tmp_path, tokenizer, [LONG, SHORT], prompt_format="raw",
                           truncation_strategy=strategy, max_length=max_length)
    assert (dataset[0]["input_ids"], dataset[0]["loss_mask"], dataset[0]["prompt_length"]) == (ids, mask, prompt_length)
    assert dataset[1]["input_ids"] == [10, 20, EOS]
    assert stats.rows_truncated == (max_length < 8)


def test_delete_drops_and_counts_long_rows(tmp_path, tokenizer):
    dataset, stats = build(tmp_path, tokenizer, [LONG, SHORT, LONG], prompt_format="raw",
                           truncation_strategy="delete", max_length=6)
    assert [row["input_ids"] for row in dataset] == [[10, 20, EOS]]
    assert (stats.rows_read, stats.rows_kept, stats.rows_skipped) == (3, 1, {"too_long": 2})
    assert "train.jsonl row 2" in stats.skipped_examples[1]


def test_right_truncation_of_a_prompt_that_fills_max_length(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"train\.jsonl row 0: .*\[fully_truncated\]"):
        build(tmp_path, tokenizer, [LONG, SHORT], prompt_format="raw", max_length=4)
    dataset, stats = build(tmp_path, tokenizer, [LONG, SHORT], prompt_format="raw", max_length=4, skip_bad_rows=True)
    assert len(dataset) == 1 and stats.rows_skipped == {"fully_truncated": 1}


def test_truncation_budget_covers_the_teacher_prompt(tmp_path, tokenizer):
    row = {**LONG, "teacher_prompt": "w30 w31 w32 w33 w34 w35"}  # 6 teacher prompt tokens
    right, _ = build(tmp_path, tokenizer, [row], prompt_format="raw", max_length=8)
    assert right[0]["input_ids"] == [10, 11, 12, 13, 20, 21]  # 6 + 2 response tokens fit
    assert len(teacher_example(right[0])["input_ids"]) == 8
    left, _ = build(tmp_path, tokenizer, [row], prompt_format="raw", max_length=8, truncation_strategy="left")
    assert left[0]["input_ids"] == [10, 11, 12, 13, 20, 21, 22, EOS]
    assert left[0]["teacher_prompt_ids"] == [32, 33, 34, 35]


# --------------------------------------------------------------------------- malformed rows

GOOD = {"messages": [user("w10"), assistant("w11")]}


@pytest.mark.parametrize("bad, reason, words", [
    ({"other": 1}, "no_format", "neither 'messages' nor 'prompt'"),
    ({"messages": [user("w10"), assistant("w11")], "prompt": "w10"}, "no_format", "both"),
    ({"messages": "w10 w11"}, "bad_type", "messages must be a list"),
    ({"prompt": 5, "completion": "w11"}, "bad_type", "prompt must be a string or a list"),
    ({"messages": [user("w10"), {"role": "bot", "content": "w11"}]}, "bad_role", "messages[1].role is 'bot'"),
    ({"messages": [user(None), assistant("w11")]}, "bad_content", "messages[0].content must be a string"),
    ({"messages": [user(["w10"]), assistant("w11")]}, "bad_content", "got list"),
    ({"prompt": "w10", "completion": " "}, "empty_response", "completion is empty"),
    ({"prompt": "w10"}, "empty_response", "no completion"),
    ({"messages": [user("w10"), assistant("")]}, "empty_response", "assistant turn 1 is empty"),
    ({"messages": [user("w10"), assistant("w11"), user("w12")]}, "bad_order", "ends with a 'user' turn"),
    ({"messages": [assistant("w11"), user("w12"), assistant("w13")]}, "bad_order", "starts with an assistant"),
    ({**GOOD, "teacher_prompt": 3}, "bad_type", "teacher_prompt must be a string"),
])
def test_malformed_row_names_file_and_row(tmp_path, tokenizer, bad, reason, words):
    with pytest.raises(DataError) as caught:
        build(tmp_path, tokenizer, [GOOD, GOOD, bad])
    error = caught.value
    assert error.file.endswith("train.jsonl") and error.row == 2 and error.reason == reason
    assert "train.jsonl row 2" in str(error) and words in str(error)


def test_skip_bad_rows_counts_by_reason(tmp_path, tokenizer):
    rows = [GOOD, {"other": 1}, {"prompt": "w10", "completion": ""}, GOOD, {"prompt": "w10"},
            {"messages": [user("w10"), {"role": "tool", "content": "w1"}]}]
    dataset, stats = build(tmp_path, tokenizer, rows, skip_bad_rows=True)
    assert len(dataset) == 2 and dataset[1]["input_ids"] == [USER, 10, EOS, ASSISTANT, 11, EOS]
    assert (stats.rows_read, stats.rows_kept, stats.skipped) == (6, 2, 4)
    assert stats.rows_skipped == {"no_format": 1, "empty_response": 2, "bad_role": 1}
    assert stats.skipped_examples[0].endswith("train.jsonl row 1: row has neither 'messages' nor 'prompt'; "
                                              "expected 'messages', or 'prompt' + 'completion' [no_format]")
    assert "4 skipped" in stats.summary()


def test_template_that_is_not_prefix_stable_is_refused(tmp_path):
    # The generation prompt writes <|sep|>, a finished assistant turn does not.
    template = TEMPLATE.replace("<|assistant|> {% endif", "<|assistant|> <|sep|> {% endif")
    tokenizer = make_tokenizer(tmp_path / "tok", template)
    with pytest.raises(TemplateError, match=r"train\.jsonl row 0: the chat template is not prefix-stable"):
        build(tmp_path, tokenizer, [GOOD], skip_bad_rows=True)  # never skipped


def test_template_errors_are_bad_rows(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok", "{% if messages[0]['role'] == 'system' %}"
                               "{{ raise_exception('no system prompts') }}{% endif %}" + TEMPLATE)
    with pytest.raises(DataError, match=r"row 1: the chat template refused .*no system prompts"):
        build(tmp_path, tokenizer, [GOOD, {"messages": [system("w20")] + GOOD["messages"]}])


def test_tokenizer_without_chat_template(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok", chat_template=None)
    with pytest.raises(ConfigError, match=r"data\.prompt_format='chat' is invalid: 'raw', or a tokenizer with a chat"):
        build(tmp_path, tokenizer, [SIMPLE])
    with pytest.raises(ConfigError, match=r"data\.tokenizer=.* with a chat template for rows given as messages"):
        build(tmp_path, tokenizer, [GOOD], prompt_format="raw")
    dataset, _ = build(tmp_path, tokenizer, [SIMPLE], prompt_format="raw")
    assert dataset[0]["input_ids"] == [10, 11, 12, EOS]


# --------------------------------------------------------------------------- files

def test_file_types_give_the_same_rows(tmp_path, tokenizer):
    rows = [GOOD, {"messages": [user("w12"), assistant("w13 w14")]}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    files = [write_jsonl(tmp_path / "rows.jsonl", rows), str(tmp_path / "rows.json"),
             str(tmp_path / "rows.parquet"), str(tmp_path / "saved")]
    expected = [[USER, 10, EOS, ASSISTANT, 11, EOS], [USER, 12, EOS, ASSISTANT, 13, 14, EOS]]
    for file in files:
        dataset, _ = build(tmp_path, tokenizer, files=[file])
        assert dataset["input_ids"] == expected, file


def test_files_concatenate_in_order_with_different_columns(tmp_path, tokenizer):
    first = write_jsonl(tmp_path / "a.jsonl", [{**GOOD, "answer": "w50"}, {"prompt": "w60", "completion": "w61"}])
    # Messages with an extra key give the column another type: it is stored as JSON.
    datasets.Dataset.from_list([{"messages": [{**user("w12"), "name": "x"}, assistant("w13")],
                                 "teacher_prompt": "w30"}]).save_to_disk(str(tmp_path / "b"))
    dataset, stats = build(tmp_path, tokenizer, files=[first, str(tmp_path / "b")])
    assert dataset["input_ids"] == [[USER, 10, EOS, ASSISTANT, 11, EOS], [USER, 60, EOS, ASSISTANT, 61, EOS],
                                    [USER, 12, EOS, ASSISTANT, 13, EOS]]
    assert dataset["answer"] == ["w50", None, None]
    assert dataset["teacher_prompt_ids"] == [None, None, [USER, 30, EOS, ASSISTANT]]
    assert dataset[2]["messages"][0] == {"role": "user", "content": "w12", "name": "x"}
    assert stats.rows_read == 3


def test_a_second_build_reuses_the_cache(tmp_path, tokenizer):
    files = [write_jsonl(tmp_path / "rows.jsonl", [GOOD, SIMPLE])]
    first, _ = build(tmp_path, tokenizer, files=files)
    cached = sorted(path.name for path in (tmp_path / "cache").glob("tokenized-*.arrow"))
    second, _ = build(tmp_path, tokenizer, files=files)
    assert len(cached) == 1 and sorted(path.name for path in (tmp_path / "cache").glob("tokenized-*.arrow")) == cached
    assert second["input_ids"] == first["input_ids"]
    raw, _ = build(tmp_path, tokenizer, files=files, prompt_format="raw")  # another key, another file
    assert raw[1]["input_ids"] == [10, 11, 12, EOS]
    assert len(list((tmp_path / "cache").glob("tokenized-*.arrow"))) == 2


def test_loading_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "rows.csv").write_text("prompt,completion\n")
    with pytest.raises(ValueError, match=r"rows\.csv.*unknown type '\.csv'.*\.jsonl, \.json or \.parquet"):
        load_rows(str(tmp_path / "rows.csv"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train'\]"):
        load_rows(str(tmp_path / "dict"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="is not a saved dataset"):
        load_rows(str(tmp_path / "empty_dir"))
    with pytest.raises(ValueError, match="data.val_dataset is empty"):
        build_dataset(DataConfig(dataset=["a.jsonl"]), tokenizer, split="val")
    with pytest.raises(ValueError, match="no usable rows"):
        build(tmp_path, tokenizer, [{"other": 1}], skip_bad_rows=True)


def test_val_split(tmp_path, tokenizer):
    dataset, _ = build(tmp_path, tokenizer, files=[write_jsonl(tmp_path / "val.jsonl", [SIMPLE])], split="val")
    assert dataset[0]["input_ids"] == [USER, 10, 11, EOS, ASSISTANT, 12, EOS]


# --------------------------------------------------------------------------- sampler

def take(iterator, steps):
    return [next(iterator) for _ in range(steps)]


def test_iterator_is_seeded_and_wraps_epochs():
    batches = take(DataIterator(10, 4, seed=1), 6)
    assert batches == take(DataIterator(10, 4, seed=1), 6)
    assert batches != take(DataIterator(10, 4, seed=2), 6)
    # Two full batches per epoch (drop-last: 2 of 10 rows wait for a later epoch).
    for epoch in range(3):
        pair = batches[2 * epoch] + batches[2 * epoch + 1]
        assert len(set(pair)) == 8 and set(pair) <= set(range(10))
    assert batches[0:2] != batches[2:4]  # each epoch reshuffles
    assert take(DataIterator(10, 4, shuffle=False), 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]


def test_iterator_resumes_exactly():
    for stop in range(8):
        uninterrupted = take(DataIterator(10, 3, seed=5), 12)
        first = DataIterator(10, 3, seed=5)
        take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint as JSON
        assert state["consumed_samples"] == 3 * stop and {"epoch", "position", "seed"} <= set(state)
        resumed = DataIterator(10, 3, seed=5)
        resumed.load_state_dict(state)
        assert take(resumed, 12 - stop) == uninterrupted[stop:]
        assert resumed.consumed_samples == 36


def test_iterator_refuses_a_different_order_on_resume():
    state = DataIterator(10, 3, seed=5).state_dict()
    with pytest.raises(ValueError, match="saved seed=5, now 6"):
        DataIterator(10, 3, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="saved num_samples=10, now 11"):
        DataIterator(11, 3, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        DataIterator(2, 3)


def test_local_batch():
    assert local_batch([5, 6, 7, 8, 9, 10], 1, 3) == [7, 8]
    with pytest.raises(ValueError, match="does not split"):
        local_batch([1, 2, 3], 0, 2)


# --------------------------------------------------------------------------- collate

EXAMPLES = [{"input_ids": [3, 10, 11, 4, 12, 2], "loss_mask": [0, 0, 0, 0, 1, 1], "prompt_length": 4},
            {"input_ids": [3, 13, 4, 14], "loss_mask": [0, 0, 0, 1], "prompt_length": 3}]


def test_collate_pads_and_shifts_the_mask():
    batch = collate(EXAMPLES, pad_token_id=0)
    assert batch["tokens"].dtype == torch.long and batch["tokens"].tolist() == [[3, 10, 11, 4, 12, 2],
                                                                                [3, 13, 4, 14, 0, 0]]
    # loss_mask[i, t] scores tokens[i, t + 1].
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]
    assert batch["lengths"].tolist() == [6, 4] and batch["prompt_lengths"].tolist() == [4, 3]
    labels = batch["tokens"][:, 1:]
    assert labels[batch["loss_mask"].bool()].tolist() == [12, 2, 14]


def test_collate_fixed_and_rounded_lengths():
    assert collate(EXAMPLES, 0, seq_length=8)["tokens"].shape == (2, 9)
    batch = collate(EXAMPLES, 0, pad_to_multiple_of=4)
    assert batch["tokens"].shape == (2, 9) and batch["loss_mask"].shape == (2, 8)  # s = 5 -> 8
    assert batch["loss_mask"][:, 5:].sum() == 0
    with pytest.raises(ValueError, match="more than seq_length"):
        collate(EXAMPLES, 0, seq_length=4)
    with pytest.raises(ValueError, match="pad_token_id is None"):
        collate(EXAMPLES, None)


def test_collate_of_built_rows_and_their_teacher_view(tmp_path, tokenizer):
    dataset, _ = build(tmp_path, tokenizer, [{**SIMPLE, "teacher_prompt": "w30 w31 w32"}, GOOD])
    rows = [dataset[i] for i in range(2)]
    student = collate(rows, pad_token_id(tokenizer))
    teacher = collate([teacher_example(row) for row in rows], pad_token_id(tokenizer))
    assert student["tokens"].shape == (2, 7) and teacher["tokens"].shape == (2, 8)
    for batch in (student, teacher):  # the same response tokens are scored in both views
        assert batch["tokens"][:, 1:][batch["loss_mask"].bool()].tolist() == [12, EOS, 11, EOS]


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("data, message", [
    ({}, "missing required key data.dataset"),
    ({"dataset": "a.jsonl"}, "data.dataset='a.jsonl' is invalid: a list of str"),
    ({"dataset": []}, r"data.dataset=\[\] is invalid: a non-empty list of paths"),
    ({"dataset": ["a.jsonl"], "max_length": 1}, "data.max_length=1 is invalid: an integer >= 2"),
    ({"dataset": ["a.jsonl"], "truncation_strategy": "middle"},
     r"data.truncation_strategy='middle' is invalid: one of \['right', 'left', 'delete'\]"),
    ({"dataset": ["a.jsonl"], "prompt_format": "text"},
     r"data.prompt_format='text' is invalid: one of \['chat', 'raw'\]"),
    ({"dataset": ["a.jsonl"], "seed": -1}, "data.seed=-1 is invalid: an integer >= 0"),
    ({"dataset": ["a.jsonl"], "num_proc": 0}, "data.num_proc=0 is invalid"),
    ({"dataset": ["a.jsonl"], "val_dataset": [""]}, r"data.val_dataset\[0\]='' is invalid"),
    ({"dataset": ["a.jsonl"], "shuffle": "yes"}, "data.shuffle='yes' is invalid: true or false"),
    ({"dataset": ["a.jsonl"], "epochs": 2}, "unknown key.* data.epochs"),
])
def test_config_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(DataConfig, data, prefix="data")


def test_config_defaults_and_direct_construction():
    config = from_dict(DataConfig, {"dataset": ["a.jsonl"]}, prefix="data")
    assert (config.val_dataset, config.tokenizer, config.max_length) == ([], None, 2048)
    assert (config.truncation_strategy, config.allow_prompt_only, config.num_proc) == ("right", False, 1)
    assert (config.prompt_format, config.skip_bad_rows, config.shuffle, config.seed) == ("chat", False, True, 42)
    with pytest.raises(ConfigError, match="data.dataset='a.jsonl' is invalid"):
        DataConfig(dataset="a.jsonl")
    with pytest.raises(ConfigError, match="data.truncation_strategy='middle'"):
        DataConfig(dataset=["a.jsonl"], truncation_strategy="middle")
