"""`megatron-opd cache-teacher --config X.yaml --out DIR [key=value ...]`: the teacher cache, written once.

Runs the config's teacher (`teacher_model` in process at the config's TP/PP, or
`teacher_model_server`) over every row of the training data (and the val data) in
order, keeps its top `gkd_logits_topk` ids and full-vocab log-probs at each response
token (`teachers.cache_writer`), and stores them with `datasets` (`teachers.cache` has
the layout). Off-policy GKD then trains from DIR with `teacher_cache: DIR` and no
teacher loaded, with the loss the live teacher gives. DIR appears only when complete.
Data parallelism is not used: the world is the teacher's TP x PP.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state

from megatron_opd.checkpoint.megatron_checkpoint import atomic_output_dir
from megatron_opd.checkpoint.pretrained import load_pretrained
from megatron_opd.checkpoint.run_models import resolve_models
from megatron_opd.commands.errors import add_debug_flag, run_command
from megatron_opd.config.job import JobConfig, load_job_config
from megatron_opd.config.schema import ConfigError
from megatron_opd.data import OUTPUT_COLUMNS, pad_token_id, tokenized_split
from megatron_opd.runtime import initialize_runtime
from megatron_opd.runtime.precision import resolve_dtype
from megatron_opd.teachers import LocalTeacher
from megatron_opd.teachers.build import remote_teacher
from megatron_opd.teachers.cache import CACHE_FORMAT, METADATA
from megatron_opd.teachers.cache_writer import cache_split

PROG = "megatron-opd cache-teacher"


def check_cache_config(config: JobConfig) -> int:
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


def write_cache(config: JobConfig, out: Path, force: bool) -> dict:
    k = check_cache_config(config)
    models = resolve_models(config)
    runtime = initialize_runtime(config.parallel)
    model_parallel = config.parallel.tensor_model_parallel_size * config.parallel.pipeline_model_parallel_size
    if runtime.world_size != model_parallel:
        raise ConfigError(f"cache-teacher runs on TP x PP = {model_parallel} ranks, not {runtime.world_size}: "
                          "launch it with that many processes (no data parallelism)")
    teacher = remote_teacher(config, models, runtime)
    if teacher is None:
        model = load_pretrained(models.teacher, runtime, "teacher",
                                resolve_dtype(config.training.precision, runtime.device), compute=config.compute)
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
            dataset = tokenized_split(config.data, models.tokenizer, split, runtime)
            dataset = dataset.select_columns(list(OUTPUT_COLUMNS))
            metadata["splits"][split] = cache_split(teacher, dataset, split, config, models.vocab_size, pad_id,
                                                    staging, writes, runtime.device.type)
        if writes:
            (staging / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def cache(args: argparse.Namespace) -> int:
    metadata = write_cache(load_job_config(args.config, args.overrides), args.out, args.force)
    if torch.distributed.get_rank() == 0:
        print(f"wrote {args.out}: top-{metadata['k']} of {metadata['teacher']}, rows {metadata['splits']}", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the training YAML (its teacher, data and gkd_logits_topk)")
    parser.add_argument("--out", required=True, type=Path, help="the cache directory to write")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_command(PROG, lambda: cache(args), debug=args.debug)

if __name__ == "__main__":
    sys.exit(main())
