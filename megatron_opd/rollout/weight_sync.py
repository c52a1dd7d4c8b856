"""Pushing the Megatron student's weights into a colocated vLLM engine, bucket by bucket.

    stream = export_hf_weights(model, config, dst_rank=None)    # every rank, collective
    sync = WeightSync(llm, transport, bucket_bytes)              # the replica's first rank
    for name, tensor in stream: sync.add(name, tensor)           # packs, flushes full buckets
    sync.finish()                                                # last bucket, completeness check

The TP/PP shards are gathered to full HF tensors one at a time by the converter's
streaming export (`checkpoint.hf_weights.export_hf_weights`: no full model copy on any
rank, no disk); the replica's first rank packs them into one reusable buffer of at most
`bucket_bytes` (a larger tensor goes alone) and hands each full buffer to vLLM's
`model.load_weights` in its worker (`rollout.vllm_worker`) through `collective_rpc`. The
extra memory of a sync is about one bucket.

A transport says where the buffer lives and how the worker maps it:
  - `SharedMemoryTransport` (CPU): a file in /dev/shm that both processes map;
  - `CudaIPCTransport` (GPU, colocated): one CUDA buffer shared by an IPC handle, as
    vLLM's own IPC weight-transfer engine does. UNTESTED: no GPU was lent to this
    project yet; `tools/gpu_acceptance.sh` runs it when one is.

Written here rather than with vLLM's `weight_transfer` trainer engines: those join
their own all-gather over the trainer's whole world (a Megatron world is many model-
parallel groups, each with its own engine) and stream from a `WeightSource` that would
have to wrap the same export anyway.
"""

from __future__ import annotations

import base64
import os
import pickle
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

ALIGNMENT = 64  # bytes: every tensor starts aligned, so a uint8 slice views as any dtype


class Transport(Protocol):
    def buffer(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer of at least `nbytes` that the worker can map (reused, grown on demand)."""

    def rpc(self, llm: Any, table: dict[str, list]) -> list[str]:
        """Have the worker load the buffer's tensors listed in `table` (names, dtypes, shapes, offsets)."""

    def close(self) -> None:
        ...


class SharedMemoryTransport:
    """A shared-memory file both the trainer and vLLM's worker map (CPU)."""

    def __init__(self, directory: Optional[Path] = None):
        directory = directory or (Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir()))
        self.path = directory / f"megatron_opd_weights_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self._buffer: Optional[torch.Tensor] = None

    def buffer(self, nbytes: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = None
            with open(self.path, "wb") as file:
                file.truncate(nbytes)
            self._buffer = torch.from_file(str(self.path), shared=True, size=nbytes, dtype=torch.uint8)
        return self._buffer

    def rpc(self, llm: Any, table: dict[str, list]) -> list[str]:
        results = llm.collective_rpc("megatron_opd_load_shared_bucket",
                                     args=(str(self.path), self._buffer.numel(), table["names"], table["dtypes"],
                                           table["shapes"], table["offsets"]))
        return results[0]

    def close(self) -> None:
        self._buffer = None
        self.path.unlink(missing_ok=True)


class CudaIPCTransport:
    """One CUDA buffer on the trainer's GPU, shared with vLLM's worker by an IPC handle.
    UNTESTED (no GPU lent yet)."""

    def __init__(self, device: torch.device):
        self.device = device
        # The worker finds the buffer's GPU by UUID: its own device numbering may differ
        # (CUDA_VISIBLE_DEVICES), and a vLLM TP worker on another GPU reads it peer to peer.
        self.gpu_uuid = str(torch.cuda.get_device_properties(device).uuid)
        self._buffer: Optional[torch.Tensor] = None
        self._handle: Optional[str] = None

    def buffer(self, nbytes: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < nbytes:
            from torch.multiprocessing.reductions import reduce_tensor

            self._buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._handle = base64.b64encode(pickle.dumps(reduce_tensor(self._buffer))).decode()
        return self._buffer

    def rpc(self, llm: Any, table: dict[str, list]) -> list[str]:
        torch.cuda.synchronize(self.device)  # the copies into the buffer are done before the worker reads
        results = llm.collective_rpc("megatron_opd_load_cuda_ipc_bucket",
                                     args=(self._handle, self.gpu_uuid, table["names"], table["dtypes"],
                                           table["shapes"], table["offsets"]))
        return results[0]

    def close(self) -> None:
        self._buffer = self._handle = None


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class WeightSync:
    """One sync's packing on the engine's host rank: `add` every HF tensor, then `finish`."""

    def __init__(self, llm: Any, transport: Transport, bucket_bytes: int, dtype: torch.dtype,
                 parameter_names: list[str], hf_names: list[str]):
        """`parameter_names`: vLLM's (fused); `hf_names`: every HF tensor the sync must push."""
        self.llm, self.transport, self.bucket_bytes, self.dtype = llm, transport, bucket_bytes, dtype
        self.parameter_names, self.hf_names = parameter_names, hf_names
        self.pushed: set[str] = set()
        self.loaded: set[str] = set()
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.pending_bytes = 0
        self.buckets = 0
        llm.collective_rpc("megatron_opd_begin_sync")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.to(self.dtype)
        size = _aligned(tensor.numel() * tensor.element_size())
        if self.pending and self.pending_bytes + size > self.bucket_bytes:
            self.flush()
        self.pending.append((name, tensor))
        self.pushed.add(name)
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        buffer = self.transport.buffer(max(self.pending_bytes, self.bucket_bytes))
        table: dict[str, list] = {"names": [], "dtypes": [], "shapes": [], "offsets": []}
        offset = 0
        for name, tensor in self.pending:
            nbytes = tensor.numel() * tensor.element_size()
            buffer[offset:offset + nbytes].view(tensor.dtype).copy_(tensor.reshape(-1))
            table["names"].append(name)
            table["dtypes"].append(str(tensor.dtype).removeprefix("torch."))
            table["shapes"].append(list(tensor.shape))
            table["offsets"].append(offset)
            offset += _aligned(nbytes)
        self.loaded.update(self.transport.rpc(self.llm, table))
        self.pending, self.pending_bytes = [], 0
        self.buckets += 1

    def finish(self) -> None:
        """Push the last bucket. Every HF tensor of the model must have been pushed (vLLM's
        layerwise reload would fill a layer's missing part with uninitialized memory, not keep
        its old values) and every vLLM parameter written."""
        unpushed = [name for name in self.hf_names if name not in self.pushed]
        if unpushed:
            raise ValueError(f"the weight sync pushed no {unpushed[0]} ({len(unpushed)} HF tensor(s) missing): "
                             "vLLM would sample with an incomplete layer")
        self.flush()
        self.llm.collective_rpc("megatron_opd_finish_sync")
        # The KV blocks cached for shared prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        missing = sorted(set(self.parameter_names) - self.loaded)
        if missing:
            raise ValueError(f"the weight sync left {len(missing)} vLLM parameter(s) unwritten, first "
                             f"{missing[:3]}: the pushed HF tensors do not cover the model vLLM built")
