"""The synthetic tasks of the CPU quickstart and demos: digit permutations and multi-digit addition.

`PermutationTask` (the quickstart's): any ordering of a prompt's digits is right, so a
teacher's distribution carries more than a reference answer (see its docstring).
`AdditionTask` (the demos'): a row is `{"prompt": "47+385=", "completion": "432"}`: two non-negative operands and
their sum, most significant digit first; or, with `little_endian` (the demos'
choice), every number written least significant digit first, `"74+583=" -> "234"`,
the order in which the digits of a sum are computed, carry by carry: a tiny model
learns that form several times faster (as reported for small transformers by Lee et al.,
"Teaching Arithmetic to Small Transformers", 2023), which keeps the CPU demos short. The task is chosen
because a model that knows nothing gets it wrong, the right answer is checkable
without a reference model (`answer`, `score`), and a tiny model on a character
vocabulary of 15 tokens learns it in minutes on a CPU.

Everything here is deterministic given a seed and keeps no module state: the data
comes from `random.Random` instances seeded per split, the train/val split from a
stable hash of the pair, and the random model from a forked torch RNG.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from megatron_opd.config.schema import is_int

PathLike = Union[str, Path]

SPLITS = ("train", "val")
# One in this many (a, b) pairs is held out for validation.
VAL_FRACTION_INVERSE = 10
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Ids 0 and 1 are pad and eos; <unk> comes last so the task's own symbols are dense.
VOCAB = (PAD, EOS, *"0123456789", "+", "=", UNK)
# What `write_tokenizer` writes, and `write_random_model` copies into a model directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_PROMPT = re.compile(r"([0-9]+)\+([0-9]+)=")



@dataclass(frozen=True)
class AdditionTask:
    """Addition of two operands of 1..`max_digits` digits each.

    The digit count of each operand is drawn uniformly first and the operand uniformly
    among the numbers of that many digits (0..9 for one digit), so short and long
    operands are equally common; drawing the operands uniformly would make nearly all
    of them `max_digits` long and leave the short cases untrained.
    """

    max_digits: int = 3
    seed: int = 0
    little_endian: bool = False  # every number written least significant digit first

    def __post_init__(self) -> None:
        if not is_int(self.max_digits) or self.max_digits < 1:
            raise ValueError(f"AdditionTask.max_digits must be an integer >= 1, got {self.max_digits!r}")
        if not is_int(self.seed):
            raise ValueError(f"AdditionTask.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.little_endian, bool):
            raise ValueError(f"AdditionTask.little_endian must be true or false, got {self.little_endian!r}")

    def split_of(self, a: int, b: int) -> str:
        """'val' for about one pair in `VAL_FRACTION_INVERSE`, else 'train'.

        A hash of the pair rather than a held-out list: it needs no enumeration of the
        pair space, is the same in every process and Python version (unlike `hash`),
        and keeps the splits disjoint however many rows are drawn from each.
        """
        digest = hashlib.blake2b(f"{self.seed}:{a}+{b}".encode(), digest_size=8).digest()
        return "val" if int.from_bytes(digest, "big") % VAL_FRACTION_INVERSE == 0 else "train"

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(1, self.max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    def rows(self, count: int, split: str) -> list[dict[str, str]]:
        """`count` rows of `split`, drawn with replacement, the same for the same task.

        Pairs of the other split are rejected, so each split's draw depends only on the
        seed and the split name; the train rows do not change when val rows are added.
        """
        if not is_int(count) or count < 0:
            raise ValueError(f"count must be an integer >= 0, got {count!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"addition/{self.seed}/{split}")  # str seeds are hashed stably
        rows: list[dict[str, str]] = []
        # A split holds about 1/10 of the pairs; only a tiny pair space (max_digits=1,
        # 100 pairs) could hold none, which must fail rather than loop forever.
        attempts_left = 1000 + 100 * count
        while len(rows) < count:
            if attempts_left == 0:
                raise ValueError(f"split {split!r} of AdditionTask(max_digits={self.max_digits}, seed={self.seed}) "
                                 f"holds (almost) no pairs; raise max_digits or change the seed")
            attempts_left -= 1
            a, b = self._operand(rng), self._operand(rng)
            if self.split_of(a, b) == split:
                write = _reversed if self.little_endian else str
                rows.append({"prompt": f"{write(a)}+{write(b)}=", "completion": write(a + b)})
        return rows

    def score(self, prompts: list[str], completions: list[str]) -> float:
        """Exact-match accuracy of `completions` (module-level `score` in this task's digit order)."""
        return score(prompts, completions, self.little_endian)


@dataclass(frozen=True)
class PermutationTask:
    """Any ordering of a multiset of digits: `{"prompt": "3817=", "completion": "1783"}`.

    A prompt is `min_digits`..`max_digits` random digits and '='; every permutation of
    them is a right answer (`is_permutation`), and the reference completion is one
    permutation drawn uniformly. A teacher that learned the task puts, at each answer
    position, its probability on every digit not yet written (in proportion to how many
    are left): the set of right next tokens, of which a reference string shows one. That
    is the case distillation is for: the teacher's distribution says more than the data.
    """

    min_digits: int = 3
    max_digits: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("min_digits", "max_digits"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"PermutationTask.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_digits < self.min_digits:
            raise ValueError(f"PermutationTask.max_digits ({self.max_digits}) must be >= min_digits "
                             f"({self.min_digits})")
        if not is_int(self.seed):
            raise ValueError(f"PermutationTask.seed must be an integer, got {self.seed!r}")

    def split_of(self, digits: str) -> str:
        """'val' for about one prompt in `VAL_FRACTION_INVERSE`, else 'train' (a stable hash)."""
        digest = hashlib.blake2b(f"permute/{self.seed}:{digits}".encode(), digest_size=8).digest()
        return "val" if int.from_bytes(digest, "big") % VAL_FRACTION_INVERSE == 0 else "train"

    def rows(self, count: int, split: str) -> list[dict[str, str]]:
        """`count` rows of `split`, drawn with replacement, the same for the same task."""
        if not is_int(count) or count < 0:
            raise ValueError(f"count must be an integer >= 0, got {count!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"permute/{self.seed}/{split}")
        rows: list[dict[str, str]] = []
        attempts_left = 1000 + 100 * count
        while len(rows) < count:
            if attempts_left == 0:
                raise ValueError(f"split {split!r} of {self} holds (almost) no prompts; raise max_digits")
            attempts_left -= 1
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(self.min_digits, self.max_digits)))
            if self.split_of(digits) == split:
                rows.append({"prompt": f"{digits}=", "completion": "".join(rng.sample(digits, len(digits)))})
        return rows

    def score(self, prompts: list[str], completions: list[str]) -> float:
        """Fraction of `completions` that are a permutation of their prompt's digits."""
        return _fraction(prompts, completions, is_permutation)


def is_permutation(prompt: str, completion: str) -> bool:
    """Whether `completion` orders the digits of a 'digits=' prompt ('3817=', '1783' -> True)."""
    if not isinstance(prompt, str) or re.fullmatch(r"[0-9]+=", prompt) is None:
        raise ValueError(f"prompt must look like 'digits=', got {prompt!r}")
    return sorted(completion) == sorted(prompt[:-1])


def _fraction(prompts: list[str], completions: list[str], right) -> float:
    """Fraction of completions (each cut at its first '<eos>' and stripped) `right` for their prompt."""
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions must have the same length, got {len(prompts)} and "
                         f"{len(completions)}")
    if not prompts:
        raise ValueError("score needs at least one prompt; the accuracy of nothing is undefined")
    return sum(bool(right(prompt, completion.split(EOS, 1)[0].strip()))
               for prompt, completion in zip(prompts, completions)) / len(prompts)


def _reversed(number: int) -> str:
    return str(number)[::-1]


def answer(prompt: str, little_endian: bool = False) -> str:
    """The correct completion of an 'a+b=' prompt, e.g. '47+385=' -> '432'
    (little-endian: '74+583=' -> '234')."""
    match = _PROMPT.fullmatch(prompt) if isinstance(prompt, str) else None
    if match is None:
        raise ValueError(f"prompt must look like 'a+b=' with decimal operands, got {prompt!r}")
    a, b = match.group(1), match.group(2)
    if little_endian:
        return _reversed(int(a[::-1]) + int(b[::-1]))
    return str(int(a) + int(b))


def score(prompts: list[str], completions: list[str], little_endian: bool = False) -> float:
    """Exact-match accuracy of `completions` against the correct answers.

    A completion counts up to its first '<eos>' (a decode that kept special tokens, or
    a model that went on after it), with surrounding whitespace removed.
    """
    return _fraction(prompts, completions, lambda prompt, completion: completion == answer(prompt, little_endian))


def write_dataset(out_dir: PathLike, task: AdditionTask | PermutationTask, train_rows: int,
                  val_rows: int) -> dict[str, Path]:
    """`train.jsonl` and `val.jsonl` of `task` in `out_dir`; returns {'train': path, 'val': path}.

    Rows are prompt/completion strings, the form the data pipeline reads with
    `prompt_format: raw` (it appends the eos token to the completion itself).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in (("train", train_rows), ("val", val_rows)):
        path = out_dir / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in task.rows(count, split)))
        paths[split] = path
    return paths


def write_tokenizer(out_dir: PathLike) -> Path:
    """A character-level fast tokenizer over `VOCAB`, saved to `out_dir` (returned).

    One token per character, so the model sees digits as digits and a decode is the
    exact string (a `Fuse` decoder: no spaces between tokens). No BOS: the prompt is
    the text as written. The config names `PreTrainedTokenizerFast` rather than
    transformers 5's `TokenizersBackend`, so transformers 4 loads it too, and it stays
    a plain fast tokenizer when it sits next to a Llama config.json.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(VOCAB)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                        clean_up_tokenization_spaces=False)
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def write_random_model(
    out_dir: PathLike,
    tokenizer_dir: PathLike,
    *,
    hidden_size: int,
    num_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    intermediate_size: int,
    seed: int,
    max_position_embeddings: int = 64,
) -> Path:
    """A randomly initialised fp32 Llama in HF format, with the tokenizer, in `out_dir` (returned).

    A complete HF model directory (config.json, model.safetensors, tokenizer files), so
    it is loaded exactly like a downloaded checkpoint. The settings are the ones our
    Megatron model reproduces (SwiGLU, no biases, untied head); the initialisation is
    transformers' own, under `seed` in a forked RNG so the caller's RNG is untouched.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if num_attention_heads < 1 or hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads "
                         f"({num_attention_heads})")
    if num_key_value_heads < 1 or num_attention_heads % num_key_value_heads:
        raise ValueError(f"num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads "
                         f"({num_key_value_heads})")
    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    # Copied, not re-saved: a re-save under transformers 5 would rename the tokenizer class.
    for name in TOKENIZER_FILES:
        source, target = tokenizer_dir / name, out_dir / name
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
    return out_dir
