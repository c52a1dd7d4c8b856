"""Writing the teacher cache: a teacher run over a dataset in order, its top-K kept per response token.

`cache_split` runs the run's teachers (`teachers.routing.TeacherSet`: in process or
servers, each only on the rows routed to it) over every row of one split, global batch by
global batch, and keeps each row's teacher's top-K ids (its `gkd_logits_topk`) and
full-vocab log-probs at each response token (temperature 1, as a server returns them);
`teachers.cache` has the layout and reads it back. One teacher writes one cache; several
write one cache per teacher (`DIR/<name>/`), each holding its own rows. The command is
`megatron-opd cache-teacher` (`commands.cache_teacher`).

Rows are written as Parquet shards while the teacher runs (memory stays bounded), then
turned into one memory-mapped Arrow dataset per split.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

from megatron_opd.config.job import JobConfig
from megatron_opd.pipeline import make_microbatches
from megatron_opd.teachers.cache import cache_features
from megatron_opd.teachers.outputs import TeacherHidden, TeacherTopK
from megatron_opd.teachers.routing import TeacherSet

SHARD_ROWS = 4096  # rows per Parquet shard written while the teacher runs


def _topk(output, labels, k: int, vocab_size: int) -> TeacherTopK:
    """A teacher's answer at `labels` `[n]` as top-K (collective over TP for an in-process teacher)."""
    if isinstance(output, TeacherHidden):
        return output.topk(k, labels.to(output.hidden.device), vocab_size)
    return output


class _SplitWriter:
    """Rows of one split -> Parquet shards -> an Arrow dataset (on the writing rank only)."""

    def __init__(self, directory: Path, split: str):
        self.directory, self.split = directory, split
        self.shards_dir = directory / f".{split}-shards"
        self.shards_dir.mkdir(parents=True)
        self.shards: list[str] = []
        self.buffer: dict[str, list] = {name: [] for name in cache_features()}
        self.rows = 0

    def add(self, row: int, input_ids, answer: TeacherTopK, start: int, count: int) -> None:
        span = slice(start, start + count)
        self.buffer["row"].append(row)
        self.buffer["input_ids"].append(list(input_ids))
        self.buffer["topk_ids"].append(answer.ids[span].cpu().numpy().astype(np.int32))
        self.buffer["topk_logprobs"].append(answer.logprobs[span].cpu().numpy().astype(np.float32))
        self.buffer["token_logprobs"].append(answer.label_logprobs[span].cpu().numpy().astype(np.float32))
        self.rows += 1
        if len(self.buffer["row"]) >= SHARD_ROWS:
            self.flush()

    def flush(self) -> None:
        from datasets import Dataset

        if not self.buffer["row"]:
            return
        path = self.shards_dir / f"{len(self.shards):05d}.parquet"
        Dataset.from_dict(self.buffer, features=cache_features()).to_parquet(str(path))
        self.shards.append(str(path))
        self.buffer = {name: [] for name in self.buffer}

    def finish(self) -> int:
        from datasets import Dataset

        self.flush()
        arrow_cache = self.directory / f".{self.split}-arrow"
        if self.shards:
            dataset = Dataset.from_parquet(self.shards, features=cache_features(), cache_dir=str(arrow_cache))
        else:  # a teacher no row of this split is routed to
            dataset = Dataset.from_dict({name: [] for name in cache_features()}, features=cache_features())
        dataset.save_to_disk(str(self.directory / self.split))
        del dataset
        shutil.rmtree(self.shards_dir)
        shutil.rmtree(arrow_cache, ignore_errors=True)
        return self.rows


def cache_split(teachers: TeacherSet, dataset, split: str, config: JobConfig, vocab_size: int, pad_id: int,
                staging: Path, writes: bool, device_type: str, routes: list[int] | None = None) -> dict[str, int]:
    """Run the teachers over `dataset` in order, global batch by global batch, each row by its
    teacher (`routes`: each row's teacher index; None: one teacher); rows written per teacher.
    `device_type`: the run's device ('cuda' or 'cpu'), which sets the microbatches' padding.
    One teacher writes under `staging`, several under `staging/<name>`."""
    batch_size = config.training.global_batch_size
    micro = config.training.micro_batch_size
    names = teachers.names
    ks = {member.name: member.topk for member in teachers.members}
    writers = None
    if writes:
        writers = {name: _SplitWriter(staging / name if len(names) > 1 else staging, split) for name in names}
    started, total = time.monotonic(), len(dataset)
    for start in range(0, total, batch_size):
        examples = [{**dataset[row], "_row": row, "_split": split, "_teacher": routes[row] if routes else 0}
                    for row in range(start, min(total, start + batch_size))]
        real = len(examples)
        # Megatron's schedule needs equal microbatches: fill the last one with empty rows.
        examples += [{"input_ids": [pad_id, pad_id], "loss_mask": [0, 0], "prompt_length": 2,
                      "_teacher": 0}] * (-real % micro)
        microbatches = make_microbatches(examples, pad_id, config, device_type)
        outputs = teachers.forward(microbatches, examples)
        if outputs is None:
            continue
        spans: dict[int, tuple] = {}  # example -> its teacher's answer for its microbatch, offset, count
        for batch, mix in zip(microbatches, outputs):
            labels = batch.labels[batch.loss_mask]
            counts = dict(zip(batch.rows, batch.example_token_counts()))
            for part in mix.parts:
                answer = _topk(part.answer, labels if part.index is None else labels[part.index], ks[part.name],
                               vocab_size)
                offset = 0
                for row in batch.rows:  # the part's tokens: its rows' tokens, in batch order
                    if names[teachers.route(examples[row])] == part.name:
                        spans[row] = (answer, offset, counts[row])
                        offset += counts[row]
        for row, example in enumerate(examples):  # in dataset order (a token budget regroups rows)
            if writers is not None and "_row" in example:
                writers[names[teachers.route(example)]].add(example["_row"], example["input_ids"], *spans[row])
        if writes:
            done = min(total, start + batch_size)
            print(f"cache-teacher {split}: {done}/{total} rows, {done / max(time.monotonic() - started, 1e-9):.1f} "
                  "rows/s", file=sys.stderr, flush=True)
    return {name: writer.finish() for name, writer in writers.items()} if writers is not None else {}
