"""Read and write HF safetensors checkpoints one tensor at a time.

Reading uses `safetensors.safe_open` (memory-mapped, one tensor materialized at a time).

Writing is by hand: safetensors' own writers (`save_file`, `save_model`) take a
whole dict of tensors per file, so a 5 GB shard would sit in memory next to the
model it comes from. The format is a little-endian u64 header length, a JSON header
(dtype, shape, byte offsets of every tensor) and the raw bytes in header order. As
every tensor's name, shape and dtype are known before the first byte is written (from
the model's config), the header is written first and each tensor streamed after it;
peak memory is one tensor. Files and `model.safetensors.index.json` follow HF's
naming, so `transformers` and `safetensors` read them as their own.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open

from megatron_opd.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Non-parameter buffers some older checkpoints carry; recomputed, never converted.
IGNORED_HF_TENSORS = (".rotary_emb.inv_freq",)

# How a config.json names the weights' dtype.
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


class HFWeightReader:
    """The tensors of an HF model directory's safetensors files, by name.

    Every file is opened (its header read and its size checked against it) and the index
    checked against the files' contents here, so a missing, truncated or mismatched file
    is refused, naming it, before any model is built.
    """

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self._handles: dict[Path, object] = {}
        index = self.directory / INDEX_FILE
        if index.is_file():
            self._file_of = {name: self.directory / file for name, file in _read_index(index).items()}
            missing_files = sorted({f.name for f in self._file_of.values() if not f.is_file()})
            if missing_files:
                raise CheckpointNotFoundError(
                    f"{self.directory}: {INDEX_FILE} names {len(missing_files)} shard file(s) that are not there, "
                    f"first {missing_files[:3]}: the download or copy is incomplete; download the model again")
            for file in sorted(set(self._file_of.values())):
                stored = set(self._open(file).keys())
                absent = sorted(name for name, where in self._file_of.items() if where == file and name not in stored)
                if absent:
                    raise CorruptCheckpointError(
                        f"{index} lists {len(absent)} tensor(s) in {file.name} that it does not hold, first "
                        f"{absent[:3]}: the index does not match the shard files; download the index and "
                        "the shards again")
        elif (self.directory / SINGLE_FILE).is_file():
            file = self.directory / SINGLE_FILE
            self._file_of = {name: file for name in self._open(file).keys()}
        else:
            found = sorted(p.name for p in self.directory.glob("*")) if self.directory.is_dir() else []
            raise CheckpointNotFoundError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {self.directory} (found: {found or 'nothing'}); "
                "only safetensors checkpoints are read: convert pytorch_model.bin with "
                "transformers' save_pretrained(..., safe_serialization=True) first")

    def _open(self, file: Path):
        """The open safetensors file, opened once; a truncated or corrupt one refused naming it."""
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(file, framework="pt")
            except SafetensorError as error:
                raise CorruptCheckpointError(_corrupt(file, error)) from error
            except FileNotFoundError as error:
                raise CheckpointNotFoundError(f"{file} is not there ({error.strerror}): download the model "
                                              "again") from error
            except OSError as error:
                raise CheckpointError(f"{file} cannot be read: {error.strerror or error}: check that it is a "
                                      "readable file") from error
        return self._handles[file]

    def names(self) -> list[str]:
        return [name for name in self._file_of if not name.endswith(IGNORED_HF_TENSORS)]

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"{self.directory} has no tensor {name!r}")
        file = self._file_of[name]
        try:
            return self._open(file).get_tensor(name)
        except SafetensorError as error:
            raise CorruptCheckpointError(_corrupt(file, error, name)) from error

    def dtype(self) -> Optional[torch.dtype]:
        """The dtype of the first floating tensor (the checkpoint's storage dtype), read from
        the file header: no tensor is loaded."""
        names = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
        for name in self.names():
            dtype = names.get(self._open(self._file_of[name]).get_slice(name).get_dtype())
            if dtype is not None and dtype.is_floating_point:
                return dtype
        return None


def _corrupt(file: Path, error: Exception, tensor: Optional[str] = None) -> str:
    reading = f" reading tensor {tensor!r}" if tensor is not None else ""
    return (f"{file} is truncated or corrupt (safetensors{reading}: {error}), e.g. from an interrupted "
            "download or copy: download it again, or convert it again if megatron-opd wrote it")


def _read_index(index: Path) -> dict[str, str]:
    """The weight map (tensor name -> shard file name) of a `model.safetensors.index.json`."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = "has no weight_map" if isinstance(error, (KeyError, TypeError)) else f"is not valid JSON ({error})"
        raise CorruptCheckpointError(f"{index} {problem}: the index is truncated or corrupt; download it "
                                     "again") from error
    if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
        raise CorruptCheckpointError(f"{index}: weight_map must map tensor names to shard file names; the index "
                                     "is corrupt: download it again")
    return weight_map


def config_with_dtype(hf_config: dict, dtype: torch.dtype) -> dict:
    """`hf_config` saying its weights are `dtype`: in `dtype`, the key transformers >= 4.56
    writes and reads first (`torch_dtype` only when `dtype` is absent), and in `torch_dtype`
    too when the config has it (older transformers read only that), so neither contradicts
    the weights."""
    config = dict(hf_config)
    config["dtype"] = HF_DTYPE_NAMES[dtype]
    if "torch_dtype" in config:
        config["torch_dtype"] = HF_DTYPE_NAMES[dtype]
    return config


def _header(entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> tuple[bytes, int]:
    """The safetensors header for tensors in this order, and the data size after it."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return encoded, offset


class StreamingSafetensorsWriter:
    """Writes `plan` (name, shape, dtype), in order, into HF-named shards of at most
    `max_shard_bytes` each (a tensor larger than that gets a shard of its own).

        writer = StreamingSafetensorsWriter(out_dir, plan)
        for name, tensor in tensors:   # in plan order
            writer.write(name, tensor)
        writer.close()                 # index file; raises if a tensor was not written
    """

    def __init__(self, directory: Path | str, plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 5 * 2**30):
        self.directory = Path(directory)
        self._shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        shard_bytes = 0
        for name, shape, dtype in plan:
            size = torch.Size(shape).numel() * dtype.itemsize
            if self._shards[-1] and shard_bytes + size > max_shard_bytes:
                self._shards.append([])
                shard_bytes = 0
            self._shards[-1].append((name, tuple(shape), dtype))
            shard_bytes += size
        count = len(self._shards)
        self._files = ([SINGLE_FILE] if count == 1 else
                       [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._pending: Iterator[tuple[int, tuple[str, tuple[int, ...], torch.dtype]]] = (
            (shard, entry) for shard, entries in enumerate(self._shards) for entry in entries)
        self._open_shard = -1
        self._handle: Optional[BinaryIO] = None
        self._total_bytes = 0

    def _open(self, shard: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header, _ = _header(self._shards[shard])
        self._handle = open(self.directory / self._files[shard], "wb")
        self._handle.write(struct.pack("<Q", len(header)))
        self._handle.write(header)
        self._open_shard = shard

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            shard, (expected_name, shape, dtype) = next(self._pending)
        except StopIteration:
            raise ValueError(f"{name}: every planned tensor was already written") from None
        if (name, tuple(tensor.shape), tensor.dtype) != (expected_name, shape, dtype):
            raise ValueError(f"expected {expected_name} {shape} {dtype} next, got {name} "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        if shard != self._open_shard:
            self._open(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(data.numpy().data)
        self._total_bytes += data.numel()

    def close(self) -> None:
        unwritten = [entry[0] for _, entry in self._pending]
        if self._handle is not None:
            self._handle.close()
        if unwritten:
            raise ValueError(f"{len(unwritten)} planned tensor(s) never written, first {unwritten[0]}")
        if len(self._files) > 1:
            weight_map = {name: self._files[shard]
                          for shard, entries in enumerate(self._shards) for name, _, _ in entries}
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
