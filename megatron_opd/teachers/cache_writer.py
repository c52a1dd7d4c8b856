"""`megatron-opd cache-teacher --config X.yaml --out DIR [key=value ...]`: the teacher cache, written once.

Runs the config's teacher (`teacher_model` in process at the config's TP/PP, or
`teacher_model_server`) over every row of the training data (and the val data) in
order, keeps its top `gkd_logits_topk` ids and full-vocab log-probs at each response
token (temperature 1, as a server returns them), and stores them with `datasets`
(`teachers.cache` has the layout). Off-policy GKD then trains from DIR with
`teacher_cache: DIR` and no teacher loaded, with the loss the live teacher gives.

Rows are written as Parquet shards while the teacher runs (memory stays bounded), then
turned into one memory-mapped Arrow dataset per split; DIR appears only when complete.
Data parallelism is not used: the world is the teacher's TP x PP.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_opd.checkpoint.megatron_checkpoint import atomic_output_dir
from megatron_opd.checkpoint.pretrained import load_pretrained
from megatron_opd.config.schema import ConfigError
from megatron_opd.config.train import TrainConfig, load_train_config
from megatron_opd.data import OUTPUT_COLUMNS, pad_token_id
from megatron_opd.teachers.cache import CACHE_FORMAT, METADATA, cache_features
from megatron_opd.teachers.local import LocalTeacher
from megatron_opd.teachers.outputs import TeacherHidden, TeacherTopK
from megatron_opd.teachers.server_client import TeacherServerError

SHARD_ROWS = 4096  # rows per Parquet shard written while the teacher runs


def check_cache_config(config: TrainConfig) -> int:
    """The K to cache; ConfigError naming the field when the config cannot be cached."""
    if config.teacher_cache is not None:
        raise ConfigError(f"teacher_cache={config.teacher_cache!r} is invalid for cache-teacher: set the teacher "
                          "to cache (teacher_model or teacher_model_server) instead")
    if config.teacher == "self" or (config.teacher_model is None and config.teacher_model_server is None):
        raise ConfigError("teacher_model=None is invalid for cache-teacher: it caches a teacher_model or a "
                          "teacher_model_server (not teacher: self)")
    if config.gkd_logits_topk is None:
        raise ConfigError("gkd_logits_topk=None is invalid for cache-teacher: the cache holds the teacher's top-K "
                          "per token; set K")
    return config.gkd_logits_topk


def _topk(output, batch, k: int, vocab_size: int) -> TeacherTopK:
    """A microbatch's teacher answer as top-K (collective over TP for an in-process teacher)."""
    if isinstance(output, TeacherHidden):
        labels = batch.labels[batch.loss_mask].to(output.hidden.device)
        return output.topk(k, labels, vocab_size)
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
        dataset = Dataset.from_parquet(self.shards, features=cache_features(), cache_dir=str(arrow_cache))
        dataset.save_to_disk(str(self.directory / self.split))
        del dataset
        shutil.rmtree(self.shards_dir)
        shutil.rmtree(arrow_cache, ignore_errors=True)
        return self.rows


def cache_split(teacher, dataset, split: str, config: TrainConfig, vocab_size: int, pad_id: int,
                staging: Path, writes: bool) -> int:
    """Run the teacher over `dataset` in order, global batch by global batch; rows written."""
    from megatron_opd.trainer.setup import make_microbatches

    k = config.gkd_logits_topk
    batch_size, micro = config.training.global_batch_size, config.training.micro_batch_size
    writer = _SplitWriter(staging, split) if writes else None
    started, total = time.monotonic(), len(dataset)
    for start in range(0, total, batch_size):
        examples = [{**dataset[row], "_row": row, "_split": split} for row in range(start, min(total, start + batch_size))]
        real = len(examples)
        # Megatron's schedule needs equal microbatches: fill the last one with empty rows.
        examples += [{"input_ids": [pad_id, pad_id], "loss_mask": [0, 0], "prompt_length": 2}] * (-real % micro)
        microbatches = make_microbatches(examples, pad_id, config)
        outputs = teacher.forward(microbatches, examples)
        if outputs is None:
            continue
        for index, (batch, output) in enumerate(zip(microbatches, outputs)):
            answer = _topk(output, batch, k, vocab_size)
            counts = batch.loss_mask.sum(dim=1).tolist()
            offset = 0
            for local, count in enumerate(counts):
                example = examples[index * micro + local]
                if writer is not None and "_row" in example:
                    writer.add(example["_row"], example["input_ids"], answer, offset, int(count))
                offset += int(count)
        if writes:
            done = min(total, start + batch_size)
            print(f"cache-teacher {split}: {done}/{total} rows, {done / max(time.monotonic() - started, 1e-9):.1f} "
                  "rows/s", file=sys.stderr, flush=True)
    return writer.finish() if writer is not None else 0


def write_cache(config: TrainConfig, out: Path, force: bool) -> dict:
    from megatron_opd.runtime import initialize_runtime
    from megatron_opd.trainer.setup import remote_teacher, resolve_models, tokenized_split
    from megatron_opd.trainer.trainer import resolve_dtype

    k = check_cache_config(config)
    models = resolve_models(config)
    runtime = initialize_runtime(config.parallel)
    model_parallel = config.parallel.tensor_model_parallel_size * config.parallel.pipeline_model_parallel_size
    if runtime.world_size != model_parallel:
        raise ConfigError(f"cache-teacher runs on TP x PP = {model_parallel} ranks, not {runtime.world_size}: "
                          "launch it with that many processes (no data parallelism)")
    teacher = remote_teacher(config, models, runtime)
    if teacher is None:
        model = load_pretrained(models.teacher, runtime, "teacher", resolve_dtype(config.training.precision, runtime))
        teacher = LocalTeacher(model)
    writes = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    splits = ["train"] + (["val"] if config.data.val_dataset else [])
    pad_id = pad_token_id(models.tokenizer)
    metadata = {"format": CACHE_FORMAT, "k": k, "vocab_size": models.vocab_size, "temperature": 1.0,
                "teacher": config.teacher_model or config.teacher_model_server,
                "data": {"dataset": list(config.data.dataset), "val_dataset": list(config.data.val_dataset)},
                "splits": {}}
    with atomic_output_dir(out, force) as staging:
        for split in splits:
            dataset = tokenized_split(config, models.tokenizer, split, runtime.rank)
            dataset = dataset.select_columns(list(OUTPUT_COLUMNS))
            metadata["splits"][split] = cache_split(teacher, dataset, split, config, models.vocab_size, pad_id,
                                                    staging, writes)
        if writes:
            (staging / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-opd cache-teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the training YAML (its teacher, data and gkd_logits_topk)")
    parser.add_argument("--out", required=True, type=Path, help="the cache directory to write")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    try:
        metadata = write_cache(load_train_config(args.config, args.overrides), args.out, args.force)
    except (ConfigError, FileNotFoundError, FileExistsError, TeacherServerError) as error:
        print(f"megatron-opd cache-teacher: error: {error}", file=sys.stderr)
        return 1
    if torch.distributed.get_rank() == 0:
        print(f"wrote {args.out}: top-{metadata['k']} of {metadata['teacher']}, rows {metadata['splits']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
