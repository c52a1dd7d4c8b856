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
import errno
import json
import os
import re
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
from torch.distributed.checkpoint.api import CheckpointException

from megatron_opd.checkpoint.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    OutputDirError,
    OutputExistsError,
)
from megatron_opd.checkpoint.hf_io import config_with_dtype
from megatron_opd.config.errors import UserError
from megatron_opd.config.model import ModelConfig
from megatron_opd.config.schema import from_dict, to_dict
from megatron_opd.models.tp_layout import full_to_local, unwrap
from megatron_opd.runtime.interrupts import deferred_interrupt
from megatron_opd.runtime.progress import byte_amount

METADATA_FILE = "megatron_opd_model.json"
DIST_DIR = "dist"
HF_DIR = "hf"
FORMAT_VERSION = 1
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
# Files of an HF model dir that are weights (never copied next to a Megatron checkpoint).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        raise CheckpointNotFoundError(
            f"{path} is not a complete megatron_opd checkpoint: no {METADATA_FILE} "
            f"(found: {found if found is not None else 'no such directory'})")
    try:
        raw = json.loads(file.read_text())
        if not isinstance(raw, dict):
            raise TypeError(f"a JSON {type(raw).__name__}, not an object")
    except (ValueError, TypeError) as error:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptCheckpointError(f"{file} is corrupt ({error}): this checkpoint cannot be used; take "
                                     "another one (or convert the model again)") from error
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{file}: format_version={raw.get('format_version')!r}, this "
                                      f"megatron_opd reads {FORMAT_VERSION}: convert the model again with "
                                      "this version")
    try:
        return CheckpointInfo(model=from_dict(ModelConfig, raw["model"], "model"), family=raw["family"],
                              dtype=raw["dtype"], hf_config=raw["hf_config"])
    except KeyError as error:
        raise CorruptCheckpointError(f"{file} is corrupt: it lacks {error}; this checkpoint cannot be used: "
                                     "take another one (or convert the model again)") from error


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
    # The HF config states the dtype of these weights (a bf16 checkpoint of an fp32 model).
    info = dataclasses.replace(info, model=dataclasses.replace(info.model, pad_vocab_size_to=gpt.vocab_size),
                               hf_config=config_with_dtype(info.hf_config, DTYPES[info.dtype]))
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
    if not (path / DIST_DIR / ".metadata").is_file():
        raise CheckpointNotFoundError(f"{path} is incomplete: {DIST_DIR}/.metadata is missing (a copy cut "
                                      "short?): copy the whole checkpoint directory again, or take another one")
    saved_vocab = info.model.pad_vocab_size_to
    if info.model.vocab_size > gpt.vocab_size:
        raise CheckpointMismatchError(
            f"{path}: the checkpoint's vocab_size={info.model.vocab_size} is larger than this model's padded "
            f"vocab ({gpt.vocab_size}): {_another_model(info, gpt)}")
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
    check_tensor_shapes(sharded, path, _another_model(info, gpt))
    # A Transformer Engine model asks for its modules' `_extra_state` (FP8 scaling metadata),
    # which a checkpoint of the local spec (CPU) lacks: that state keeps TE's defaults, as
    # after an HF conversion. Anything else missing is refused.
    loaded, not_saved, _ = dist_checkpointing.load(sharded, str(path / DIST_DIR),
                                                   strict=StrictHandling.RETURN_UNEXPECTED)
    not_saved = sorted(key for key in not_saved if not key.endswith("_extra_state"))
    if not_saved:
        raise CheckpointMismatchError(f"{path}: the checkpoint lacks {len(not_saved)} tensor(s) this model has, "
                                      f"first {not_saved[:3]}: {_another_model(info, gpt)}")
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
        raise CheckpointMismatchError(f"{path}: checkpoint does not match the model: missing {missing}, "
                                      f"unexpected {result.unexpected_keys}: {_another_model(info, gpt)}")
    return info


# Fields of ModelConfig that set tensor shapes, and their names in Megatron's TransformerConfig.
_SHAPE_FIELDS = {"num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
                 "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
                 "kv_channels": "kv_channels", "num_experts": "num_moe_experts",
                 "moe_ffn_hidden_size": "moe_ffn_hidden_size",
                 "moe_shared_expert_ffn_hidden_size": "moe_shared_expert_intermediate_size"}


def _another_model(info: CheckpointInfo, gpt: torch.nn.Module) -> str:
    """What to do about a checkpoint saved from another model, with the shape fields that differ."""
    saved, built = to_dict(info.model), getattr(gpt, "config", None)
    differ = [f"{name} {saved.get(name)} vs {getattr(built, megatron, None)}"
              for name, megatron in _SHAPE_FIELDS.items()
              if saved.get(name) != getattr(built, megatron, None)
              # null means "none" for these two (a dense model, no shared expert), "unset" for the rest
              and (name in ("num_experts", "moe_shared_expert_ffn_hidden_size")
                   or None not in (saved.get(name), getattr(built, megatron, None)))]
    which = f" (checkpoint vs this model: {', '.join(differ)})" if differ else ""
    return (f"the checkpoint was saved from another model{which}; load it into the model it was saved "
            f"from (its {METADATA_FILE} describes it), or use a checkpoint of this model (to resume: a new "
            "training.output_dir)")


def check_tensor_shapes(sharded: dict, path: Path, advice: str = "the checkpoint is of another model shape") -> None:
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
                                              f"checkpoint and {shape} in this model: {advice}")


def check_output_dir(out: Path | str, force: bool) -> None:
    """Refuse a non-empty (or non-directory) `out` unless `force`, and an `out` that cannot be
    created: under a file, or in a directory this process may not write."""
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputExistsError(f"--out {out} exists and is not empty; pass --force to replace it")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputDirError(_not_a_directory(out) or f"cannot create {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write {out}: {ancestor} is not writable by this user (or on a read-only "
                             "file system): choose another output directory, or fix its permissions")


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_NOT_A_DIRECTORY = {errno.EEXIST, errno.ENOTDIR}
# torch.save's zip writer reports a failed write (a full disk) as a RuntimeError, not an OSError.
_TORCH_WRITE_FAILED = ("unexpected pos", "failed writing file", "file write failed")
# Megatron-Core 0.19's dist-checkpointing writer passes on only the class of its worker's
# OSError ("Worker failure: ... error: <class 'OSError'>"), not its errno.
_WORKER_OS_ERROR = re.compile(r"error: <class '(?:builtins\.)?(OSError|IOError)'>")


def _not_a_directory(out: Path) -> Optional[str]:
    """Why `out` cannot be created when a file sits where one of its directories must be."""
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is None:
        return None
    return (f"cannot create {out}: {blocking} is a file, not a directory: choose another output directory, "
            "or move that file away")


def _free_space(directory: Path) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "unknown space"
    return byte_amount(free)


def _failures(error: BaseException) -> Iterator[BaseException]:
    """`error`, its causes and contexts, and each rank's failure inside a dist-checkpointing
    CheckpointException (writes run in worker processes, their errors come back wrapped)."""
    stack, seen = [error], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            stack += [item[0] if isinstance(item, tuple) else item for item in failures.values()]


def _is_output_path(filename, out: Path, temporary: Optional[Path]) -> bool:
    """Whether an OSError's file is the output's: `out`, a directory above it, or what is
    written in its place (the temporary directory, a moved-away `out`)."""
    path = Path(os.fsdecode(filename)).absolute()
    return (path == out or out.is_relative_to(path) or path.name.startswith(f".{out.name}.")
            or (temporary is not None and path.is_relative_to(temporary)))


def _output_failure(error: BaseException, out: Path, temporary: Optional[Path] = None) -> Optional[str]:
    """A one-line explanation when `error` is the output directory's fault (no space, not
    writable, a file in the way), else None (a bug, or an error that explains itself)."""
    if isinstance(error, UserError) or not isinstance(error, (Exception, CheckpointException)):
        return None  # already one line; KeyboardInterrupt, SystemExit
    parent = out.parent
    for failure in _failures(error):
        code, ours = None, True
        if isinstance(failure, OSError):
            # A failed read of an input file is not the output's fault.
            code = failure.errno
            ours = all(_is_output_path(name, out, temporary)
                       for name in (failure.filename, failure.filename2) if name is not None)
        else:  # an OSError that crossed a process boundary as text ("[Errno 28] No space left on device")
            found = re.search(r"\[Errno (\d+)\]", str(failure))
            code = int(found.group(1)) if found else None
            if code not in _NO_SPACE | {errno.EROFS}:
                code = None
        if code in _NO_SPACE:
            return (f"cannot write {out}: no space left on the device (or the disk quota is exceeded; "
                    f"{_free_space(parent)} free in {parent}): free some space, or choose another output "
                    "directory; nothing was written")
        if code in _NOT_WRITABLE and ours:
            reason = "is on a read-only file system" if code == errno.EROFS else "is not writable by this user"
            return (f"cannot write {out}: {parent} {reason} ({failure}): choose another output directory, "
                    "or fix its permissions")
        if code in _NOT_A_DIRECTORY and ours and _not_a_directory(out) is not None:
            return _not_a_directory(out)
        if isinstance(failure, RuntimeError) and _WORKER_OS_ERROR.search(str(failure)):
            return (f"cannot write {out}: a file write failed midway (dist-checkpointing reports an OSError "
                    f"without its cause), which is what a full disk does ({_free_space(parent)} free in {parent} "
                    "now): free some space, or choose another output directory; nothing was written")
        if isinstance(failure, RuntimeError) and any(text in str(failure) for text in _TORCH_WRITE_FAILED):
            return (f"cannot write {out}: a file write failed midway (torch: {str(failure).strip()}), which is "
                    f"what a full disk does ({_free_space(parent)} free in {parent} now): free some space, or "
                    "choose another output directory; nothing was written")
    return None


@contextmanager
def atomic_output_dir(out: Path | str, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to `out` that becomes `out` on success.

    A run killed midway leaves only `.<name>.partial-*`, never a half-written `out`.
    A non-empty `out` is refused unless `force`, and only replaced once the new
    content is complete. Collective when distributed: rank 0 picks the name and
    creates the directory, and every rank raises its error if it cannot.

    An output that cannot be written (not writable, read-only, a file in the way, a
    full disk) raises `OutputDirError` in one line naming `out`; the temporary
    directory is removed and an existing `out` is left as it was.
    """
    out = Path(out).absolute()
    check_output_dir(out, force)
    created: list[Optional[str]] = [None, None]  # the temporary name, or why it could not be created
    if _rank() == 0:
        name = f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            (out.parent / name).mkdir()
            created[0] = name
        except OSError as error:
            created[1] = _output_failure(error, out) or f"cannot create {out}: {error}"
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(created, src=0)
    if created[1] is not None:
        raise OutputDirError(created[1])
    temporary = out.parent / created[0]
    try:
        yield temporary
        _barrier()
    except BaseException as error:
        # No barrier: the failing rank may be the only one that got here.
        reason = _output_failure(error, out, temporary)
        if _rank() == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        if reason is not None:
            raise OutputDirError(reason) from error
        raise
    if _rank() == 0:
        try:
            # Ctrl-C between moving an old `out` away and renaming the new one in would leave neither.
            with deferred_interrupt(f"renaming {out.name} into place"):
                _replace(temporary, out)
        except OSError as error:
            shutil.rmtree(temporary, ignore_errors=True)
            raise OutputDirError(_output_failure(error, out, temporary) or f"cannot write {out}: {error}") from error
    _barrier()


def _replace(temporary: Path, out: Path) -> None:
    """Rename `temporary` to `out`, moving an existing `out` away first and back if that fails."""
    old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
    moved = out.exists() or out.is_symlink()
    if moved:
        os.replace(out, old)
    try:
        os.replace(temporary, out)
    except OSError:
        if moved:
            os.replace(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif moved:
        old.unlink(missing_ok=True)
