"""The quickstart's addition task, character tokenizer and random Llama writer.

Answers are recomputed here with plain int parsing, the tokenizer is checked through
`AutoTokenizer` (how the trainer loads it), and the model directory through
transformers' `AutoModelForCausalLM` and our own `model_config_from_hf`.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_opd.models.hf_config import model_config_from_hf
from megatron_opd.quickstart.task import (
    AdditionTask,
    PermutationTask,
    answer,
    is_permutation,
    score,
    write_dataset,
    write_random_model,
    write_tokenizer,
)

TINY = dict(hidden_size=32, num_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)


def pairs(rows: list[dict[str, str]]) -> set[tuple[int, int]]:
    out = set()
    for row in rows:
        a, b = row["prompt"].removesuffix("=").split("+")
        out.add((int(a), int(b)))
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return write_random_model(tmp_path_factory.mktemp("model"), tokenizer_dir, seed=0, **TINY)


# ---------------------------------------------------------------- task


def test_rows_are_deterministic_given_seed():
    task = AdditionTask(max_digits=3, seed=7)
    assert task.rows(50, "train") == AdditionTask(max_digits=3, seed=7).rows(50, "train")
    assert task.rows(20, "val") == AdditionTask(max_digits=3, seed=7).rows(20, "val")
    # A longer draw extends a shorter one, and another seed draws something else.
    assert task.rows(80, "train")[:50] == task.rows(50, "train")
    assert AdditionTask(max_digits=3, seed=8).rows(50, "train") != task.rows(50, "train")
    assert task.rows(0, "train") == []


def test_train_and_val_are_disjoint():
    task = AdditionTask(max_digits=2, seed=3)
    train, val = pairs(task.rows(3000, "train")), pairs(task.rows(300, "val"))
    assert train and val and not train & val
    assert all(task.split_of(a, b) == "train" for a, b in train)
    assert all(task.split_of(a, b) == "val" for a, b in val)
    # About one pair in ten is held out.
    held_out = sum(task.split_of(a, b) == "val" for a in range(100) for b in range(100))
    assert 700 < held_out < 1300


@pytest.mark.parametrize("max_digits", [1, 3, 5])
def test_rows_are_correct_sums_of_bounded_operands(max_digits):
    rows = AdditionTask(max_digits=max_digits, seed=1).rows(400, "train")
    lengths = set()
    for row in rows:
        assert set(row) == {"prompt", "completion"}
        match = re.fullmatch(r"([0-9]+)\+([0-9]+)=", row["prompt"])
        assert match, row
        a, b = match.groups()
        assert a == str(int(a)) and b == str(int(b))  # no leading zeros
        assert row["completion"] == str(int(a) + int(b))
        assert answer(row["prompt"]) == row["completion"]
        lengths.update((len(a), len(b)))
    # Digit counts are drawn uniformly, so every length shows up, and none longer.
    assert lengths == set(range(1, max_digits + 1))


def test_answer():
    assert answer("47+385=") == "432"
    assert answer("0+0=") == "0"
    assert answer("999+1=") == "1000"
    for bad in ["47+385", "47-385=", "a+b=", "", " 4+5=", "4+5= ", "+5=", "4++5=", "4+5=9", "٣+1="]:
        with pytest.raises(ValueError, match="a\\+b="):
            answer(bad)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_digits=0), "max_digits"),
    (dict(max_digits="3"), "max_digits"),
    (dict(max_digits=True), "max_digits"),
    (dict(seed="1"), "seed"),
    (dict(seed=1.0), "seed"),
])
def test_task_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdditionTask(**kwargs)


def test_rows_validation():
    task = AdditionTask()
    with pytest.raises(ValueError, match="count"):
        task.rows(-1, "train")
    with pytest.raises(ValueError, match="count"):
        task.rows(2.0, "train")
    with pytest.raises(ValueError, match="split.*'train', 'val'"):
        task.rows(1, "test")


def test_write_dataset(tmp_path):
    task = AdditionTask(max_digits=2, seed=5)
    paths = write_dataset(tmp_path / "data", task, train_rows=30, val_rows=10)
    assert set(paths) == {"train", "val"}
    assert paths["train"].name == "train.jsonl" and paths["val"].name == "val.jsonl"
    for split, count in (("train", 30), ("val", 10)):
        rows = [json.loads(line) for line in paths[split].read_text().splitlines()]
        assert rows == task.rows(count, split)


def test_score():
    prompts = ["47+385=", "1+2=", "9+9=", "10+5="]
    assert score(prompts, ["432", "3", "18", "15"]) == 1.0
    assert score(prompts, ["432", "4", "81", "15"]) == 0.5
    assert score(prompts, [" 432\n", "3<eos>", "18<eos>99", "15 <eos><pad><pad>"]) == 1.0
    assert score(prompts, ["", "<eos>3", "1 8", "0015"]) == 0.0
    assert score(["1+2="], ["3"]) == 1.0
    with pytest.raises(ValueError, match="same length"):
        score(prompts, ["432"])
    with pytest.raises(ValueError, match="at least one"):
        score([], [])


# ---------------------------------------------------------------- permutation task


def test_permutation_rows():
    """Each completion orders the prompt's digits (checked with a Counter, not the task's own
    check), lengths cover min..max, the splits never share a prompt, and the references of a
    repeated prompt differ: one sample of many right answers."""
    from collections import Counter

    task = PermutationTask(min_digits=3, max_digits=5, seed=1)
    train, val = task.rows(3000, "train"), task.rows(300, "val")
    assert train == task.rows(3000, "train") and val == task.rows(300, "val")
    for row in train + val:
        digits = row["prompt"].removesuffix("=")
        assert re.fullmatch(r"[0-9]{3,5}=", row["prompt"])
        assert Counter(row["completion"]) == Counter(digits)
    assert {len(row["completion"]) for row in train} == {3, 4, 5}
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in val}
    assert sum(task.split_of(f"{n:04d}") == "val" for n in range(10000)) in range(800, 1200)  # ~1 in 10
    references = {}
    for row in train:
        references.setdefault(row["prompt"], set()).add(row["completion"])
    assert any(len(answers) > 1 for answers in references.values())


def test_permutation_score():
    task = PermutationTask()
    prompts = ["3817=", "112=", "905="]
    assert task.score(prompts, ["1783", "121", "509"]) == 1.0
    assert task.score(prompts, ["3817<eos>99", " 211 ", "950<eos>"]) == 1.0
    assert task.score(prompts, ["178", "1122", "905"]) == pytest.approx(1 / 3)  # a digit short; one too many
    assert task.score(prompts, ["1784", "221", ""]) == 0.0
    assert is_permutation("3817=", "7318") and not is_permutation("3817=", "73181")
    with pytest.raises(ValueError, match="digits="):
        is_permutation("1+2=", "3")
    with pytest.raises(ValueError, match="same length"):
        task.score(prompts, ["1"])


@pytest.mark.parametrize("kwargs, field", [
    (dict(min_digits=0), "min_digits"), (dict(max_digits=2, min_digits=3), "max_digits"), (dict(seed=1.5), "seed"),
])
def test_permutation_task_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PermutationTask(**kwargs)


def test_addition_task_score_is_the_module_score():
    prompts = ["74+583=", "1+2="]
    assert AdditionTask(little_endian=True).score(prompts, ["234", "3"]) == 1.0
    assert AdditionTask().score(["47+385="], ["432"]) == 1.0 and AdditionTask().score(["47+385="], ["234"]) == 0.0


# ---------------------------------------------------------------- tokenizer


def check_tokenizer(tokenizer) -> None:
    text = "47+385=432"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # one id per character, no BOS, no EOS
    assert ids == [tokenizer.convert_tokens_to_ids(c) for c in text]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text
    assert tokenizer.bos_token is None
    assert tokenizer("1+2=")["input_ids"][0] == tokenizer.convert_tokens_to_ids("1")
    digits = {tokenizer.convert_tokens_to_ids(d) for d in "0123456789"}
    special = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(digits) == 10 and len(special) == 2 and not digits & special
    assert tokenizer.eos_token == "<eos>" and tokenizer.pad_token == "<pad>"
    assert tokenizer.unk_token_id not in ids
    assert len(tokenizer) == 15


def test_tokenizer_round_trip(tokenizer_dir):
    check_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir))


def test_tokenizer_next_to_a_llama_config(tmp_path, tokenizer_dir, model_dir):
    check_tokenizer(AutoTokenizer.from_pretrained(model_dir))
    copy = tmp_path / "copy"
    shutil.copytree(tokenizer_dir, copy)
    shutil.copyfile(model_dir / "config.json", copy / "config.json")
    check_tokenizer(AutoTokenizer.from_pretrained(copy))


# ---------------------------------------------------------------- random model


def test_random_model_loads_in_transformers(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert not model.config.tie_word_embeddings
    ids = torch.tensor([tokenizer("47+385=432")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_random_model_is_deterministic_and_leaves_rng_alone(tmp_path, tokenizer_dir, model_dir):
    state = torch.random.get_rng_state()
    again = write_random_model(tmp_path / "again", tokenizer_dir, seed=0, **TINY)
    assert torch.equal(torch.random.get_rng_state(), state)
    other = write_random_model(tmp_path / "other", tokenizer_dir, seed=1, **TINY)
    first, second, third = (load_file(d / "model.safetensors") for d in (model_dir, again, other))
    assert first.keys() == second.keys() == third.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_model_config_from_hf_accepts_random_model(model_dir):
    config = model_config_from_hf(model_dir)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads, config.num_query_groups,
            config.ffn_hidden_size, config.vocab_size) == (2, 32, 4, 2, 64, 15)
    assert config.max_position_embeddings == 64
    assert config.rotary_base == 10000.0 and config.norm_epsilon == 1e-6
    assert config.swiglu and not config.add_qkv_bias and not config.tie_word_embeddings


def test_random_model_validation(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="num_attention_heads"):
        write_random_model(tmp_path / "m", tokenizer_dir, seed=0, **{**TINY, "num_attention_heads": 3})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        write_random_model(tmp_path / "m", tokenizer_dir, seed=0, **{**TINY, "num_key_value_heads": 3})


def test_little_endian_rows_and_answers():
    """Every number reversed: the same pairs as the big-endian task, digits in reverse."""
    big = AdditionTask(max_digits=3, seed=5).rows(300, "train")
    little = AdditionTask(max_digits=3, seed=5, little_endian=True).rows(300, "train")
    for big_row, little_row in zip(big, little):
        a, b = big_row["prompt"].removesuffix("=").split("+")
        assert little_row["prompt"] == f"{a[::-1]}+{b[::-1]}="
        assert little_row["completion"] == str(int(a) + int(b))[::-1]
        assert answer(little_row["prompt"], little_endian=True) == little_row["completion"]
    assert answer("05+05=", little_endian=True) == "001"  # 50 + 50 = 100
    prompts = [row["prompt"] for row in little[:4]]
    right = [row["completion"] for row in little[:4]]
    assert score(prompts, right, little_endian=True) == 1.0
    assert score(prompts, [text[::-1] if len(text) > 1 and text != text[::-1] else "x" for text in right],
                 little_endian=True) == 0.0
    with pytest.raises(ValueError, match="little_endian"):
        AdditionTask(little_endian="yes")
