"""Pad tokenized examples into the tensors of one (micro)batch.

Layout (Megatron's GPT convention): the model reads `tokens[:, :-1]` and is scored on
labels `tokens[:, 1:]`, so a batch of b rows padded to s + 1 tokens gives

    tokens     LongTensor  [b, s + 1]
    loss_mask  FloatTensor [b, s]      loss_mask[i, t] = 1 iff predicting tokens[i, t + 1]
                                       counts: the per-token mask of the example shifted
                                       left by one; padding is always 0
    lengths        LongTensor [b]      real tokens per row (the rest is padding)
    prompt_lengths LongTensor [b]      tokens before the first response token

Padding is on the right, so with causal attention real tokens never see it; its value
does not matter for the loss.

Written by hand: transformers' collators (DataCollatorForSeq2Seq and the like) build HF's
layout (input_ids + labels with -100 + attention_mask, the shift done inside the model);
Megatron's loss wants the shifted float mask next to one [b, s + 1] token tensor.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch


def collate(examples: Sequence[Mapping[str, Any]], pad_token_id: int, seq_length: Optional[int] = None,
            pad_to_multiple_of: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Right-pad `examples` (dicts with `input_ids`, `loss_mask`, optionally `prompt_length`).

    s is the longest example's length - 1, rounded up to a multiple of
    `pad_to_multiple_of` (what sequence / context parallelism need of the model's input
    length), or exactly `seq_length` when given (a fixed shape; a longer example raises
    rather than being cut).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: pass the tokenizer's pad or eos id (see pad_token_id())")
    lengths = [len(example["input_ids"]) for example in examples]
    for example, length in zip(examples, lengths):
        if len(example["loss_mask"]) != length:
            raise ValueError(f"an example has {length} input_ids but {len(example['loss_mask'])} loss_mask values")
    longest = max(lengths)
    if seq_length is not None:
        if longest > seq_length + 1:
            raise ValueError(f"an example has {longest} tokens, more than seq_length + 1 = {seq_length + 1}")
        if pad_to_multiple_of and seq_length % pad_to_multiple_of:
            raise ValueError(f"seq_length={seq_length} is not a multiple of pad_to_multiple_of={pad_to_multiple_of}")
        s = seq_length
    else:
        s = max(longest - 1, 1)
        if pad_to_multiple_of:
            s = -(-s // pad_to_multiple_of) * pad_to_multiple_of
    # Padded as lists, one tensor each: a row-by-row copy cost ~20 us per row (as much as a small model's step).
    tokens = torch.tensor([list(example["input_ids"]) + [pad_token_id] * (s + 1 - length)
                           for example, length in zip(examples, lengths)], dtype=torch.long)
    token_mask = torch.tensor([list(example["loss_mask"]) + [0] * (s + 1 - length)
                               for example, length in zip(examples, lengths)], dtype=torch.float32)
    return {
        "tokens": tokens,
        # The mask of the token being predicted: label t is tokens[:, t + 1].
        "loss_mask": token_mask[:, 1:].contiguous(),
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "prompt_lengths": torch.tensor([example.get("prompt_length", 0) for example in examples], dtype=torch.long),
    }


def teacher_example(example: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher's view of an example: its `teacher_prompt_ids` followed by the same
    response, or the example itself when it has no teacher prompt.

    Response token j sits at `prompt_length + j` in the student's view and at
    `len(teacher_prompt_ids) + j` in the teacher's; `collate` of either gives masks with
    the same number of ones in the same order.
    """
    teacher = example.get("teacher_prompt_ids")
    if teacher is None:
        return dict(example)
    start = example["prompt_length"]
    return {**example, "input_ids": list(teacher) + list(example["input_ids"][start:]),
            "loss_mask": [0] * len(teacher) + list(example["loss_mask"][start:]),
            "prompt_length": len(teacher)}


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS (Llama has no pad token),
    else 0. Padded positions are masked, so any id in the vocabulary will do."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


__all__ = ["collate", "pad_token_id", "teacher_example"]
