"""The teacher cache: a teacher's top-K at every response token of a dataset, computed once.

`megatron-opd cache-teacher` (`teachers.cache_writer`) runs the teacher (local or a
server) over the data's own responses; off-policy GKD then trains from the directory
(`teacher_cache: DIR`, `lmbda: 0`) with no teacher loaded, and gets the loss the live
teacher would give with the same K (`teachers.outputs.TeacherTopK` either way).

    DIR/teacher_cache.json   format, K, teacher, vocab size, rows per split
    DIR/train/, DIR/val/     `datasets` save_to_disk directories (Arrow, memory-mapped),
                             one row per tokenized dataset row, in the dataset's order:
        row             int64                 the row's index in the tokenized dataset (a cache
                                              of one teacher of several holds its rows only)
        input_ids       [L] int32             the tokens the teacher read
        topk_ids        [n][K] int32          n = the row's response tokens (loss mask)
        topk_logprobs   [n][K] float32        full-vocab log-probs at temperature 1, descending
        token_logprobs  [n] float32           log-prob of the response token itself

Every row read is checked against the training data's own tokens: a cache built from
other data, another tokenizer or other truncation fails naming the row, instead of
distilling toward another sequence's teacher.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_opd.config.schema import ConfigError
from megatron_opd.pipeline import Microbatch
from megatron_opd.teachers.outputs import TeacherTopK

CACHE_FORMAT = 1
METADATA = "teacher_cache.json"


def cache_features():
    from datasets import Features, Sequence, Value

    return Features({"row": Value("int64"), "input_ids": Sequence(Value("int32")),
                     "topk_ids": Sequence(Sequence(Value("int32"))),
                     "topk_logprobs": Sequence(Sequence(Value("float32"))),
                     "token_logprobs": Sequence(Value("float32"))})


def read_metadata(path: Path) -> dict:
    metadata_file = path / METADATA
    if not metadata_file.is_file():
        raise ConfigError(f"teacher_cache={str(path)!r} is invalid: no {METADATA} there (write one with "
                          "`megatron-opd cache-teacher --config X.yaml --out DIR`)")
    metadata = json.loads(metadata_file.read_text())
    if metadata.get("format") != CACHE_FORMAT:
        raise ConfigError(f"teacher_cache={str(path)!r} has format {metadata.get('format')!r}, this version reads "
                          f"format {CACHE_FORMAT}: rebuild it")
    return metadata


class TeacherCache:
    """The cached teacher as a teacher source: `forward(microbatches, examples)`."""

    def __init__(self, path: str, k: int, vocab_size: int, device: torch.device):
        from datasets import load_from_disk

        self.path = Path(path)
        metadata = read_metadata(self.path)
        if k > metadata["k"]:
            raise ConfigError(f"gkd_logits_topk={k} is invalid with teacher_cache={path!r}: the cache holds the "
                              f"teacher's top {metadata['k']} per token")
        if metadata["vocab_size"] != vocab_size:
            raise ConfigError(f"teacher_cache={path!r} was written for a vocab of {metadata['vocab_size']} ids, "
                              f"the student's is {vocab_size}")
        self.k, self.device, self.metadata = k, device, metadata
        self.splits = {split: load_from_disk(str(self.path / split)).with_format("numpy")
                       for split in metadata["splits"]}
        # dataset row -> position in the cache, where the cache holds some rows only (None: all, in order)
        self.positions = {split: _row_positions(np.asarray(data["row"])) for split, data in self.splits.items()}

    def forward(self, microbatches: list[Microbatch], examples: list[dict]) -> Optional[list[TeacherTopK]]:
        """Per microbatch on the last stage: the cached top-K of its rows' response tokens
        (`examples`: the step's rows, each with its split and dataset row, picked by `batch.rows`)."""
        if not parallel_state.is_pipeline_last_stage():
            return None
        outputs = []
        for batch in microbatches:
            rows = [examples[row] for row in batch.rows]
            counts = batch.example_token_counts()
            parts = [self._row(example, int(count)) for example, count in zip(rows, counts)]
            outputs.append(TeacherTopK(*(torch.cat(column).to(self.device) for column in zip(*parts))))
        return outputs

    def _row(self, example: dict, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        split, row = example["_split"], example["_row"]
        if split not in self.splits:
            raise ConfigError(f"teacher_cache={str(self.path)!r} has no {split!r} split (it has "
                              f"{sorted(self.splits)}): rebuild it with this config's data")
        positions = self.positions[split]
        position = row if positions is None else positions.get(row)
        if position is None or position >= len(self.splits[split]):
            raise ConfigError(f"teacher_cache={str(self.path)!r} has no {split} row {row} (it holds "
                              f"{len(self.splits[split])} rows): it was built from other data or another routing "
                              "of rows to teachers; rebuild it with this config")
        cached = self.splits[split][position]
        if int(cached["row"]) != row or not np.array_equal(cached["input_ids"], np.asarray(example["input_ids"])):
            raise ConfigError(f"teacher_cache={str(self.path)!r} does not match the {split} data at row {row}: "
                              "it was built from other data, tokenizer or truncation; rebuild it")
        if len(cached["token_logprobs"]) != count:
            raise ConfigError(f"teacher_cache={str(self.path)!r}, {split} row {row}: {len(cached['token_logprobs'])} "
                              f"cached tokens for {count} response tokens")
        shape = (count, self.metadata["k"])
        return (torch.from_numpy(np.asarray(cached["topk_logprobs"], dtype=np.float32).reshape(shape)[:, :self.k]),
                torch.from_numpy(np.asarray(cached["topk_ids"], dtype=np.int64).reshape(shape)[:, :self.k]),
                torch.from_numpy(np.asarray(cached["token_logprobs"], dtype=np.float32)))

def _row_positions(rows: np.ndarray) -> Optional[dict[int, int]]:
    if np.array_equal(rows, np.arange(len(rows))):
        return None
    return {int(row): position for position, row in enumerate(rows.tolist())}


__all__ = ["CACHE_FORMAT", "METADATA", "TeacherCache", "cache_features", "read_metadata"]
