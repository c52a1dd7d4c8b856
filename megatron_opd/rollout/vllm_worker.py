"""The trainer's side door into a vLLM worker: loading pushed weight buckets.

vLLM mixes this class into its worker (`LLM(worker_extension_cls=...)`), so its methods
run in the worker process, beside vLLM's model, when the trainer calls
`LLM.collective_rpc("<method>", args=...)`. The arguments cross a process boundary as
msgpack, which carries no tensors, so a bucket travels as a *location* plus a table of
(name, dtype, shape, byte offset): a shared-memory file on CPU, a CUDA IPC handle of one
packed device buffer on GPU. Each bucket goes into vLLM's own `model.load_weights`
(HF names in; vLLM fuses q/k/v and gate/up itself), between vLLM's layerwise-reload
calls (`initialize_layerwise_reload` / `finalize_layerwise_reload`, what its own
weight-transfer engines do: backends such as the CPU one repack a layer's weights after
loading, so a reload restores the checkpoint-format parameters first and re-processes
each layer once all of its tensors arrived).

This module must import nothing of megatron_opd beyond the standard library and torch:
vLLM imports it by name inside its worker processes.
"""

from __future__ import annotations

import base64
import logging
import pickle

import torch


class _RotaryNotice(logging.Filter):
    """vLLM's layerwise reload warns "RotaryEmbedding: Failed to load weights" for every
    layer at every sync: its cos/sin cache is a buffer no checkpoint holds (and it is
    restored as it was). Dropped, so that a real failure among them stays visible."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryNotice())


def bucket_tensors(buffer: torch.Tensor, names: list[str], dtypes: list[str], shapes: list[list[int]],
                   offsets: list[int]) -> list[tuple[str, torch.Tensor]]:
    """The bucket's tensors, copied out of `buffer` (flat uint8): vLLM's layerwise reload
    keeps the tensors it is given until their layer is complete, and a layer may span
    buckets while the trainer refills the same buffer for the next one."""
    views = []
    for name, dtype_name, shape, offset in zip(names, dtypes, shapes, offsets):
        dtype = getattr(torch, dtype_name)
        count = 1
        for size in shape:
            count *= size
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        views.append((name, buffer[offset:offset + nbytes].view(dtype).view(shape).clone()))
    return views


class WeightLoaderExtension:
    """Methods vLLM adds to its worker (`self` is the worker)."""

    def megatron_opd_parameter_names(self) -> list[str]:
        """vLLM's own parameter names (fused: `qkv_proj`, `gate_up_proj`)."""
        return [name for name, _ in self.model_runner.model.named_parameters()]

    def megatron_opd_begin_sync(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self._megatron_opd_ties = tied_parameters(self.model_runner.model)
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.model)

    def megatron_opd_finish_sync(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.model, self.vllm_config.model_config)

    def megatron_opd_load_shared_bucket(self, path: str, total_bytes: int, names: list[str], dtypes: list[str],
                                        shapes: list[list[int]], offsets: list[int]) -> list[str]:
        """Load the bucket laid out in the shared-memory file `path` (CPU). Returns the vLLM
        parameter names it wrote."""
        buffer = torch.from_file(path, shared=True, size=total_bytes, dtype=torch.uint8)
        return self._megatron_opd_load(bucket_tensors(buffer, names, dtypes, shapes, offsets))

    def megatron_opd_load_cuda_ipc_bucket(self, handle: str, gpu_uuid: str, names: list[str], dtypes: list[str],
                                          shapes: list[list[int]], offsets: list[int]) -> list[str]:
        """Load the bucket in the trainer's CUDA buffer shared by IPC (`handle`: base64 of the
        pickled `torch.multiprocessing.reductions.reduce_tensor` result) on the GPU `gpu_uuid`.
        UNTESTED: no GPU has run this path yet (tools/gpu_acceptance.sh runs it)."""
        rebuild, arguments = pickle.loads(base64.b64decode(handle))
        arguments = list(arguments)
        arguments[6] = _device_index(gpu_uuid)  # the buffer's GPU as this process numbers it
        buffer = rebuild(*arguments)
        loaded = self._megatron_opd_load(bucket_tensors(buffer, names, dtypes, shapes, offsets))
        torch.cuda.synchronize()
        return loaded

    def _megatron_opd_load(self, weights: list[tuple[str, torch.Tensor]]) -> list[str]:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        model = self.model_runner.model
        loaded: set[str] = set()
        with set_current_vllm_config(self.vllm_config):
            # One tensor per call, so that a refusal names its tensor (vLLM's own errors
            # are often a bare shape assertion); the per-call cost is a dict lookup per level.
            for name, tensor in weights:
                try:
                    loaded.update(model.load_weights(iter([(name, tensor)])) or ())
                except Exception as error:  # noqa: BLE001 - whatever vLLM raised, name the tensor
                    raise ValueError(f"vLLM refused the pushed tensor {name} of shape {tuple(tensor.shape)} "
                                     f"({type(error).__name__}: {error})") from error
            # vLLM's layerwise reload does not keep ties (its docstring says so) and its
            # `load_weights` skips a tied LM head: the head's layer would keep its old
            # (backend-processed) weights. Load the same tensor through each alias too.
            tensors = dict(weights)
            for loaded_name, aliases in self._megatron_opd_ties:
                if loaded_name in tensors:
                    for alias in aliases:
                        parameter = model.get_parameter(alias)
                        getattr(parameter, "weight_loader", default_weight_loader)(parameter, tensors[loaded_name])
                        loaded.add(alias)
        return sorted(loaded)


def _device_index(gpu_uuid: str) -> int:
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == gpu_uuid:
            return index
    raise ValueError(f"the trainer's GPU {gpu_uuid} is not visible to this vLLM worker "
                     "(CUDA_VISIBLE_DEVICES): colocated vLLM must run on the trainer's GPUs")


def tied_parameters(model: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """(first name, other names) of every parameter reachable under several names (a tied
    LM head and embedding)."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return [(group[0], group[1:]) for group in names.values() if len(group) > 1]
