"""HF <-> Megatron conversions: hf_to_megatron, megatron_to_hf (the command is
`megatron-opd convert`, `commands.convert`, which also holds `verify`).

Every input is checked before a process group, a model or an output directory is
created, so a bad input leaves the output untouched and raises naming the problem.
Outputs are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_opd.checkpoint.hf_io import HF_DTYPE_NAMES, HFWeightReader, config_with_dtype
from megatron_opd.checkpoint.hf_weights import load_hf_weights, write_hf_weights
from megatron_opd.checkpoint.megatron_checkpoint import (
    DTYPES,
    HF_DIR,
    CheckpointInfo,
    atomic_output_dir,
    check_output_dir,
    copy_hf_side_files,
    dtype_name,
    save_model_checkpoint,
)
from megatron_opd.checkpoint.pretrained import Pretrained, inspect_pretrained, load_pretrained
from megatron_opd.config.compute import ComputeConfig
from megatron_opd.config.model import MAKE_VOCAB_SIZE_DIVISIBLE_BY
from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.config.schema import ConfigError
from megatron_opd.models.builder import build_gpt_model
from megatron_opd.runtime.progress import Progress, is_rank_zero, log

# Conversion builds Megatron's local layer spec on any device: a checkpoint's tensors and
# names do not depend on the spec (the local spec saves under Transformer Engine's names),
# TE models load it (keeping TE's own `_extra_state`), and converting then needs no TE.
CONVERSION_SPEC = ComputeConfig(transformer_impl="local")


def conversion_layout(tp: int, pp: int, pretrained: Pretrained, ep: int = 1,
                      etp: Optional[int] = None) -> ParallelConfig:
    """The layout a conversion runs at: tp*pp ranks, experts split over `ep` of them (each
    expert's weights over `etp`, default tp): `ep * etp` must divide `tp` x the data-parallel
    ranks, so the world is the larger of tp*pp and ep*etp*pp."""
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    pretrained.model.check_parallel(parallel)
    if not pretrained.model.is_moe and (ep != 1 or etp is not None):
        raise ConfigError(f"--ep {ep} --etp {etp}: {pretrained.path} is a dense model (no experts); "
                          "leave --ep 1 and --etp unset")
    needed = pp * max(tp, ep * parallel.expert_tensor_size)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    flags = f"--tp {tp} --pp {pp}" + (f" --ep {ep}" if ep != 1 else "") + (f" --etp {etp}" if etp else "")
    if world != needed:
        hint = (f"launch with `torchrun --nproc-per-node {needed} ...`" if world == 1
                else f"pass --tp/--pp/--ep for {world} processes")
        raise ConfigError(f"{flags} needs {needed} process(es), this run has {world}: {hint}")
    parallel.data_parallel_size(world)
    return parallel


def expect_kind(pretrained: Pretrained, kind: str, flag: str) -> None:
    if pretrained.kind != kind:
        wanted = "an HF model directory" if kind == "hf" else "a megatron_opd checkpoint"
        raise ConfigError(f"{flag} {pretrained.path} is a {pretrained.kind} checkpoint, expected {wanted}")


def hf_to_megatron(hf_path: Path, out: Path, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                   force: bool = False, make_vocab_size_divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY,
                   ep: int = 1, etp: Optional[int] = None) -> None:
    from megatron_opd.runtime import initialize_runtime

    source = inspect_pretrained(hf_path, make_vocab_size_divisible_by)
    expect_kind(source, "hf", "--hf-path")
    parallel = conversion_layout(tp, pp, source, ep, etp)
    check_output_dir(out, force)
    torch_dtype = DTYPES[dtype] if dtype else (source.dtype if source.dtype in HF_DTYPE_NAMES else torch.float32)

    runtime = initialize_runtime(parallel)
    log(f"hf-to-megatron: {source.family} from {hf_path}, {source.model.num_layers} layers, "
         f"{dtype_name(torch_dtype)}, tp={tp} pp={pp} ep={ep}")
    with atomic_output_dir(out, force) as staging:
        model = build_gpt_model(source.model, runtime, dtype=torch_dtype, initialize=False, compute=CONVERSION_SPEC)
        progress = Progress(sum(1 for _ in model.parameters()), "reading HF weights")
        load_hf_weights(model, source.model, HFWeightReader(hf_path), progress)
        progress.finish()
        started = time.monotonic()
        info = CheckpointInfo(model=source.model, family=source.family, dtype=dtype_name(torch_dtype),
                              hf_config=source.hf_config)
        save_model_checkpoint(model, info, staging, hf_dir=hf_path)
        log(f"wrote dist-checkpoint in {time.monotonic() - started:.1f}s")
    log(f"done: {out}")


def megatron_to_hf(megatron_path: Path, out: Path, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                   force: bool = False, max_shard_bytes: int = 5 * 2**30, ep: int = 1,
                   etp: Optional[int] = None) -> None:
    from megatron_opd.runtime import initialize_runtime

    source = inspect_pretrained(megatron_path)
    expect_kind(source, "megatron", "--megatron-path")
    parallel = conversion_layout(tp, pp, source, ep, etp)
    check_output_dir(out, force)
    torch_dtype = DTYPES[dtype] if dtype else source.dtype

    runtime = initialize_runtime(parallel)
    log(f"megatron-to-hf: {source.family} from {megatron_path}, {dtype_name(torch_dtype)}, tp={tp} pp={pp} "
        f"ep={ep}")
    model = load_pretrained(source, runtime, dtype=source.dtype, compute=CONVERSION_SPEC)
    with atomic_output_dir(out, force) as staging:
        if is_rank_zero():
            copy_hf_side_files(megatron_path / HF_DIR, staging)
            (staging / "config.json").write_text(json.dumps(config_with_dtype(source.hf_config, torch_dtype),
                                                            indent=2) + "\n")
        write_hf_weights(model, source.model, staging, torch_dtype, max_shard_bytes, "writing safetensors")
    log(f"done: {out}")

