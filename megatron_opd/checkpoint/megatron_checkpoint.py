"""Our Megatron model checkpoint: a Megatron-Core dist-checkpoint plus what rebuilds the model.

    DIR/
      dist/                     megatron.core.dist_checkpointing (torch_dist), any TP/PP
      hf/                       the source HF config.json, tokenizer and generation files
      megatron_opd_model.json   ModelConfig, family, dtype; written last

The JSON is written after everything else, so a directory without it is not a
checkpoint; the converter also writes the whole directory under a temporary name and
renames it (`atomic_output_dir`).

The padded vocab size is saved in the ModelConfig (`pad_vocab_size_to`), so a model
loaded at another TP keeps it, and Megatron's own resharding applies. A model built
with another padded size (a teacher padded to its student's) gets the vocab tensors
read whole and re-padded here, since dist-checkpointing requires equal global shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_opd.config.errors import UserError
from megatron_opd.config.model import ModelConfig
from megatron_opd.config.schema import from_dict, to_dict
from megatron_opd.models.tp_layout import full_to_local, unwrap

METADATA_FILE = "megatron_opd_model.json"
DIST_DIR = "dist"
HF_DIR = "hf"
FORMAT_VERSION = 1
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
# Files of an HF model dir that are weights (never copied next to a Megatron checkpoint).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint that does not fit what loads it (another model shape, another optimizer):
    the commands print it in one line."""


def dtype_name(dtype: torch.dtype) -> str:
    return {value: key for key, value in DTYPES.items()}[dtype]


@dataclasses.dataclass
class CheckpointInfo:
    """What `megatron_opd_model.json` records."""

    model: ModelConfig
    family: str
    dtype: str
    hf_config: dict[str, Any]
    format_version: int = FORMAT_VERSION


def is_megatron_checkpoint(path: Path | str) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def read_checkpoint_info(path: Path | str) -> CheckpointInfo:
    path = Path(path)
    file = path / METADATA_FILE
    if not file.is_file():
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else None
        raise FileNotFoundError(
            f"{path} is not a complete megatron_opd checkpoint: no {METADATA_FILE} "
            f"(found: {found if found is not None else 'no such directory'})")
    raw = json.loads(file.read_text())
    if raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version={raw.get('format_version')!r}, this "
                         f"megatron_opd reads {FORMAT_VERSION}")
    return CheckpointInfo(model=from_dict(ModelConfig, raw["model"], "model"), family=raw["family"],
                          dtype=raw["dtype"], hf_config=raw["hf_config"])


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def copy_hf_side_files(hf_dir: Path, out: Path) -> list[str]:
    """Copy config, tokenizer and generation files (not weights) of `hf_dir` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for file in sorted(Path(hf_dir).iterdir()):
        if file.is_file() and not file.name.endswith(_WEIGHT_SUFFIXES) and file.name not in _WEIGHT_INDEXES:
            shutil.copy2(file, out / file.name)
            copied.append(file.name)
    return copied


@torch.no_grad()
def save_model_checkpoint(model: torch.nn.Module, info: CheckpointInfo, out: Path,
                          hf_dir: Optional[Path] = None, extra_sharded: Optional[dict] = None,
                          extra_files: Optional[dict[str, Any]] = None) -> None:
    """Write the model (collective: every rank calls) and, from rank 0, the HF side files
    and the metadata JSON, last. `out` must exist and be empty.

    `extra_sharded`: more of a sharded state dict saved in the same dist-checkpoint (a
    trainer's optimizer); `extra_files`: name -> JSON-able object, written by rank 0
    before the metadata (a trainer's state).
    """
    gpt = unwrap(model)
    info = dataclasses.replace(info, model=dataclasses.replace(info.model, pad_vocab_size_to=gpt.vocab_size))
    if _rank() == 0:
        (out / DIST_DIR).mkdir()
        if hf_dir is not None:
            copy_hf_side_files(hf_dir, out / HF_DIR)
        else:
            (out / HF_DIR).mkdir()
        (out / HF_DIR / "config.json").write_text(json.dumps(info.hf_config, indent=2) + "\n")
    _barrier()
    dist_checkpointing.save({"model": gpt.sharded_state_dict(), **(extra_sharded or {})}, str(out / DIST_DIR))
    _barrier()
    if _rank() == 0:
        for name, content in (extra_files or {}).items():
            (out / name).write_text(json.dumps(content, indent=2) + "\n")
        record = {"format_version": FORMAT_VERSION, "family": info.family, "dtype": info.dtype,
                  "model": to_dict(info.model), "hf_config": info.hf_config}
        (out / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")
    _barrier()


@torch.no_grad()
def load_model_checkpoint(model: torch.nn.Module, path: Path | str) -> CheckpointInfo:
    """Load a checkpoint written by `save_model_checkpoint` into `model`, at any TP/PP,
    casting to the model's dtype. Collective: every rank calls."""
    path = Path(path)
    info = read_checkpoint_info(path)
    gpt = unwrap(model)
    saved_vocab = info.model.pad_vocab_size_to
    sharded = gpt.sharded_state_dict()
    repadded = {}
    if saved_vocab != gpt.vocab_size:
        # Read the saved vocab tensors whole and re-pad them to this model's size.
        for key in _VOCAB_PARAMS:
            if key in sharded:
                saved = sharded[key]
                buffer = torch.empty(saved_vocab, *saved.global_shape[1:], dtype=saved.dtype,
                                     device=saved.data.device)
                # Every TP rank now reads the whole tensor: one main replica among them.
                replica = saved.replica_id if isinstance(saved.replica_id, tuple) else (saved.replica_id,)
                tp_rank = parallel_state.get_tensor_model_parallel_rank()
                sharded[key] = ShardedTensor.from_rank_offsets(saved.key, buffer, replica_id=(*replica, tp_rank))
                repadded[key] = buffer
    check_tensor_shapes(sharded, path)
    # A Transformer Engine model asks for its modules' `_extra_state` (FP8 scaling metadata),
    # which a checkpoint of the local spec (CPU) lacks: that state keeps TE's defaults, as
    # after an HF conversion. Anything else missing is refused.
    loaded, not_saved, _ = dist_checkpointing.load(sharded, str(path / DIST_DIR),
                                                   strict=StrictHandling.RETURN_UNEXPECTED)
    not_saved = sorted(key for key in not_saved if not key.endswith("_extra_state"))
    if not_saved:
        raise KeyError(f"{path}: the checkpoint lacks {not_saved}, which this model has")
    # The checkpoint's common (non-sharded) state comes back too, e.g. a trainer's optimizer
    # param groups: keep what the model asked for.
    loaded = {key: value for key, value in loaded.items() if key in sharded}
    params = dict(gpt.named_parameters())
    for key in repadded:
        full = loaded.pop(key)[: info.model.vocab_size]
        padding = full.new_zeros(gpt.vocab_size - full.shape[0], *full.shape[1:])
        params[key].copy_(full_to_local(gpt, key, params[key], torch.cat([full, padding])))
    result = gpt.load_state_dict(loaded, strict=False)
    missing = [key for key in result.missing_keys if key not in repadded and not key.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise KeyError(f"{path}: checkpoint does not match the model: missing {missing}, "
                       f"unexpected {result.unexpected_keys}")
    return info


def check_tensor_shapes(sharded: dict, path: Path) -> None:
    """Refuse a checkpoint of another model shape in one line naming the tensor and both
    shapes, before dist-checkpointing fails deep inside its load ("Global shape mismatch")."""
    saved = dist_checkpointing.load_tensors_metadata(str(path / DIST_DIR))
    tensors, _ = extract_sharded_tensors_and_factories(sharded)
    for entry in nested_values(tensors):
        built = entry.build() if isinstance(entry, ShardedTensorFactory) else entry  # a GLU's two halves
        for tensor in nested_values([built]):
            if tensor.key not in saved:
                continue  # missing tensors: refused after the load, `_extra_state` allowed
            saved_shape, shape = tuple(saved[tensor.key].global_shape), tuple(tensor.global_shape)
            if saved_shape != shape:
                raise CheckpointMismatchError(f"{path}: tensor {tensor.key!r} has shape {saved_shape} in the "
                                              f"checkpoint and {shape} in this model: the checkpoint is of "
                                              f"another model shape")


def check_output_dir(out: Path | str, force: bool) -> None:
    """Refuse a non-empty (or non-directory) `out` unless `force`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --force to replace it")


@contextmanager
def atomic_output_dir(out: Path | str, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to `out` that becomes `out` on success.

    A run killed midway leaves only `.<name>.partial-*`, never a half-written `out`.
    A non-empty `out` is refused unless `force`, and only replaced once the new
    content is complete. Collective when distributed: rank 0 picks the name.
    """
    out = Path(out).absolute()
    check_output_dir(out, force)
    names = [f".{out.name}.partial-{uuid.uuid4().hex[:8]}"]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(names, src=0)
    temporary = out.parent / names[0]
    if _rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary.mkdir()
    _barrier()
    try:
        yield temporary
    except BaseException:
        # No barrier: the failing rank may be the only one that got here.
        if _rank() == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    _barrier()
    if _rank() == 0:
        old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
        if out.exists():
            os.replace(out, old)
        os.replace(temporary, out)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
