"""`megatron-opd cache-teacher --config X.yaml --out DIR [key=value ...]`: the teacher cache, written once.

Runs the config's teacher (`teacher_model` in process at the config's TP/PP, or
`teacher_model_server`) over every row of the training data (and the val data) in
order, keeps its top `gkd_logits_topk` ids and full-vocab log-probs at each response
token (`teachers.cache_writer`), and stores them with `datasets` (`teachers.cache` has
the layout). Off-policy GKD then trains from DIR with `teacher_cache: DIR` and no
teacher loaded, with the loss the live teacher gives. With several `teachers`, each row
goes to its teacher (`teacher_column`) and each teacher's rows to `DIR/<name>/`, which a
run names as that teacher's `cache`. DIR appears only when complete.
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
from megatron_opd.teachers.build import remote_teachers, teacher_set
from megatron_opd.teachers.cache import CACHE_FORMAT, METADATA
from megatron_opd.teachers.cache_writer import cache_split
from megatron_opd.teachers.routing import route_dataset

PROG = "megatron-opd cache-teacher"


def check_cache_config(config: JobConfig) -> dict[str, int]:
    """The K to cache per teacher; ConfigError naming the field when the config cannot be cached."""
    if config.teacher_cache is not None:
        raise ConfigError(f"teacher_cache={config.teacher_cache!r} is invalid for cache-teacher: set the teacher "
                          "to cache (teacher_model or teacher_model_server) instead")
    if config.teacher == "self" or (config.teacher_model is None and config.teacher_model_server is None
                                    and not config.teachers):
        raise ConfigError("teacher_model=None is invalid for cache-teacher: it caches a teacher_model or a "
                          "teacher_model_server (not teacher: self)")
    ks = {}
    for index, spec in enumerate(config.teacher_list()):
        if spec.cache is not None:
            raise ConfigError(f"teachers[{index}].cache={spec.cache!r} is invalid for cache-teacher: give that "
                              "teacher's model or server")
        k = config.teacher_topk(spec)
        if k is None:
            raise ConfigError("gkd_logits_topk=None is invalid for cache-teacher: the cache holds the teacher's "
                              "top-K per token; set K" + ("" if not config.teachers else
                                                          f" (or teachers[{index}].gkd_logits_topk)"))
        ks[spec.name] = k
    return ks


def write_cache(config: JobConfig, out: Path, force: bool) -> dict:
    """The cache(s) under `out`; the metadata written (several teachers: by teacher name)."""
    ks = check_cache_config(config)
    models = resolve_models(config)
    runtime = initialize_runtime(config.parallel)
    model_parallel = config.parallel.tensor_model_parallel_size * config.parallel.pipeline_model_parallel_size
    if runtime.world_size != model_parallel:
        raise ConfigError(f"cache-teacher runs on TP x PP = {model_parallel} ranks, not {runtime.world_size}: "
                          "launch it with that many processes (no data parallelism)")
    sources = remote_teachers(config, models, runtime)
    for name, pretrained in models.teachers.items():
        model = load_pretrained(pretrained, runtime, "teacher", resolve_dtype(config.training.precision, runtime.device),
                                compute=config.compute)
        sources[name] = LocalTeacher(model)
    teachers = teacher_set(config, sources)
    several = len(teachers) > 1
    writes = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    splits = ["train"] + (["val"] if config.data.val_dataset else [])
    pad_id = pad_token_id(models.tokenizer)
    metadata = {spec.name: {"format": CACHE_FORMAT, "k": ks[spec.name], "vocab_size": models.vocab_size,
                            "temperature": 1.0, "teacher": spec.model or spec.server,
                            "data": {"dataset": list(config.data.dataset),
                                     "val_dataset": list(config.data.val_dataset)},
                            "splits": {}}
                for spec in config.teacher_list()}
    with atomic_output_dir(out, force) as staging:
        for split in splits:
            dataset = tokenized_split(config.data, models.tokenizer, split, runtime)
            routes = None
            if several:  # the rows the run trains on, routed as it routes them
                where = "data.dataset" if split == "train" else "data.val_dataset"
                dataset, routes, _ = route_dataset(dataset, teachers.names, config, f"{where} (tokenized)")
            dataset = dataset.select_columns(list(OUTPUT_COLUMNS))
            rows = cache_split(teachers, dataset, split, config, models.vocab_size, pad_id, staging, writes,
                               runtime.device.type, routes)
            for name, count in rows.items():
                metadata[name]["splits"][split] = count
        if writes:
            for name, entry in metadata.items():
                directory = staging / name if several else staging
                (directory / METADATA).write_text(json.dumps(entry, indent=2) + "\n")
    return metadata if several else next(iter(metadata.values()))


def cache(args: argparse.Namespace) -> int:
    metadata = write_cache(load_job_config(args.config, args.overrides), args.out, args.force)
    if torch.distributed.get_rank() == 0:
        entries = {None: metadata} if "format" in metadata else metadata
        for name, entry in entries.items():
            where = args.out if name is None else args.out / name
            print(f"wrote {where}: top-{entry['k']} of {entry['teacher']}, rows {entry['splits']}", flush=True)
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
