"""Keep a frozen model's weights in host memory between uses, and on the device only while it runs.

    offload = WeightOffload(teacher, keep=[lm_head])   # device storage released now
    with offload.on_device():                          # weights copied back for the duration
        teacher(...)

A frozen model's weights never change, so the host copy is made once, at construction,
and offloading afterwards only drops the device tensors (no device-to-host copy per
step); loading copies host -> device (pinned host memory on CUDA, so the copy can
overlap). Parameters keep their identity (`param.data` is swapped), so anything holding
a reference to a parameter (Megatron's modules, the LM-head lookups) stays valid.

It works the same in CPU mode, where "device" is the CPU: the device tensors are still
separate allocations, released between uses, which is what the tests check (`resident_bytes`
and the move counters). Only on GPU does it save device memory; that saving is untested
until measured on one (docs/design.md).

Written here because Megatron-Core has no offload for a model outside its optimizer
(its CPU offload covers optimizer state and activations) and `module.to("cpu")` would
neither release buffers held elsewhere nor keep a host copy to skip the return trip.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


class WeightOffload:
    """Host copies of `model`'s parameters and buffers, except the tensors in `keep`
    (which stay on the device, e.g. an LM-head shard used after the model's forward).

    After construction the weights are offloaded; `on_device()` brings them back.
    """

    def __init__(self, model: torch.nn.Module, keep: Iterable[torch.Tensor] = ()):
        kept = {id(tensor) for tensor in keep}
        self.device = next(model.parameters()).device
        pin = self.device.type == "cuda"
        # (holder module, attribute name, host copy), once per distinct tensor: a tensor
        # registered in two modules (tied weights) is one Parameter, whose `.data` swap both see
        self._slots: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
        seen: set[int] = set()
        for module in model.modules():
            for name, tensor in _tensors_of(module):
                if tensor is None or id(tensor) in kept or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                host = tensor.detach().to("cpu", copy=True)
                self._slots.append((module, name, host.pin_memory() if pin else host))
        self.loads = self.offloads = 0
        self._resident = True
        self.offload()

    @property
    def host_bytes(self) -> int:
        return sum(host.numel() * host.element_size() for _, _, host in self._slots)

    def resident_bytes(self) -> int:
        """Bytes of the offloadable tensors now held on the device (0 when offloaded)."""
        return sum(_tensor(module, name).numel() * _tensor(module, name).element_size()
                   for module, name, _ in self._slots)

    def offload(self) -> None:
        """Release the device storage; the host copies keep the weights."""
        if not self._resident:
            return
        for module, name, host in self._slots:
            _set(module, name, torch.empty(0, dtype=host.dtype, device=self.device))
        self._resident = False
        self.offloads += 1

    def load(self) -> None:
        """Copy the weights back to fresh device storage."""
        if self._resident:
            return
        for module, name, host in self._slots:
            _set(module, name, host.to(self.device, non_blocking=True, copy=True))
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        self._resident = True
        self.loads += 1

    @contextmanager
    def on_device(self) -> Iterator[None]:
        self.load()
        try:
            yield
        finally:
            self.offload()


def _tensors_of(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module._parameters.items()
    yield from module._buffers.items()


def _tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    return module._parameters[name] if name in module._parameters else module._buffers[name]


def _set(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        module._parameters[name].data = value  # the Parameter object (and its attributes) survives
    else:
        module._buffers[name] = value
