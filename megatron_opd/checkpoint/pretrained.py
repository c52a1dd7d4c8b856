"""Build a student or teacher from a pretrained model: an HF directory or our Megatron checkpoint.

An HF directory is converted on load, in memory (`load_hf_weights`); a Megatron
checkpoint is loaded with dist-checkpointing at whatever TP/PP the run uses.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from megatron_opd.checkpoint.errors import CheckpointNotFoundError
from megatron_opd.checkpoint.hf_io import HFWeightReader
from megatron_opd.checkpoint.hf_weights import load_hf_weights
from megatron_opd.checkpoint.megatron_checkpoint import (
    DTYPES,
    HF_DIR,
    is_megatron_checkpoint,
    load_model_checkpoint,
    read_checkpoint_info,
)
from megatron_opd.config.compute import ComputeConfig
from megatron_opd.config.model import MAKE_VOCAB_SIZE_DIVISIBLE_BY, ModelConfig
from megatron_opd.models.builder import Role, build_gpt_model
from megatron_opd.models.hf_config import hf_family, model_config_from_hf, read_hf_config
from megatron_opd.runtime.distributed import Runtime
from megatron_opd.runtime.progress import Progress, log


@dataclass
class Pretrained:
    """A pretrained model directory and the architecture it holds."""

    path: Path
    kind: Literal["hf", "megatron"]
    model: ModelConfig
    family: str
    hf_config: dict[str, Any]
    dtype: Optional[torch.dtype]  # the stored weights' dtype, when known

    @property
    def tokenizer_dir(self) -> Path:
        """Where its tokenizer files are (a Megatron checkpoint keeps them in `hf/`)."""
        return self.path / HF_DIR if self.kind == "megatron" else self.path


def inspect_pretrained(path: Path | str, make_vocab_size_divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> Pretrained:
    """What is at `path`, checked without loading weights.

    Raises `CheckpointNotFoundError` (a FileNotFoundError) for a directory that is neither
    kind, `CheckpointError`s for missing or corrupt weight files, and the config errors of
    `model_config_from_hf` for an unsupported HF model.
    """
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise CheckpointNotFoundError(f"pretrained model {path} {what}: give an HF model directory "
                                      "(config.json + *.safetensors) or a megatron_opd checkpoint")
    if is_megatron_checkpoint(path):
        info = read_checkpoint_info(path)
        return Pretrained(path, "megatron", info.model, info.family, info.hf_config, DTYPES[info.dtype])
    if (path / "config.json").is_file():
        hf_config = read_hf_config(path)
        model = model_config_from_hf(hf_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        reader = HFWeightReader(path)  # fails now, not after the model is built, if weights are missing
        return Pretrained(path, "hf", model, hf_family(hf_config).model_type, hf_config, reader.dtype())
    found = sorted(p.name for p in path.iterdir())
    raise CheckpointNotFoundError(f"{path} is neither an HF model directory (config.json + *.safetensors) nor a "
                            f"megatron_opd checkpoint (megatron_opd_model.json); it holds {found or 'nothing'}")


def load_pretrained(
    source: Pretrained | Path | str,
    runtime: Runtime,
    role: Role = "student",
    dtype: torch.dtype = torch.float32,
    pad_vocab_size_to: Optional[int] = None,
    progress: Optional[str] = None,
    compute: ComputeConfig = ComputeConfig(),
) -> torch.nn.Module:
    """This rank's part of the pretrained model as a Megatron GPTModel (see `build_gpt_model`).

    `pad_vocab_size_to` overrides the padded vocab size, e.g. the one a teacher and a
    student share (`with_common_padded_vocab`); `progress`: a label under which rank 0
    reports the tensors read from an HF directory (`runtime.progress.Progress`) and the
    time taken; `compute`: layer spec, attention backend, activation recomputation.
    """
    if not isinstance(source, Pretrained):
        source = inspect_pretrained(source)
    model_config = source.model
    if pad_vocab_size_to is not None:
        model_config = dataclasses.replace(model_config, pad_vocab_size_to=pad_vocab_size_to)
    # No random init: every weight is loaded below (both loaders fail on a missing one).
    model = build_gpt_model(model_config, runtime, role=role, dtype=dtype, initialize=False, compute=compute)
    started = time.monotonic()
    if source.kind == "hf":
        tensors = Progress(sum(1 for _ in model.parameters()), progress) if progress else None
        load_hf_weights(model, model_config, HFWeightReader(source.path), tensors)
    else:
        load_model_checkpoint(model, source.path)
    if progress:
        log(f"{progress}: done in {time.monotonic() - started:.1f}s")
    return model
