"""Start a teacher server as a subprocess and wait until it serves: for tests, tools and scripts.

    with start_server("path/to/model", max_logprobs=20) as server:
        post(server.url + "/v1/completions", ...)
        server.kill()                                  # a crash, mid-run
    with start_server("path/to/model", port=server.port) as server:   # the same address again
        ...

`kill()` SIGKILLs the server with everything under it (torchrun and all its ranks);
`stop()` is the graceful path, SIGTERM to rank 0, and returns the exit code (0 when the
server shut down cleanly).
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import psutil

_READY = re.compile(r"^serving (?P<name>.+) on (?P<url>http://\S+)$")


def server_command(model: Path | str, *, tp: int = 1, port: int = 0, max_logprobs: int = 20,
                   args: Sequence[str] = (), python: str = sys.executable) -> list[str]:
    """The command line of a server for `model`: plain Python at TP=1, torchrun at TP > 1."""
    serve = ["-m", "megatron_opd.commands.serve_teacher", "--model", str(model), "--port", str(port),
             "--max-logprobs", str(max_logprobs), "--tp", str(tp), *args]
    if tp == 1:
        return [python, *serve]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp), *serve]


@dataclass
class TeacherServer:
    """A running server subprocess: its base URL, the process, and its recent output."""

    url: str
    name: str
    process: subprocess.Popen
    tp: int
    rank0_pid: int  # the process that serves HTTP and takes SIGTERM (under torchrun, not `process`)
    output: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def health(self, timeout: float = 10.0) -> dict:
        """`GET /health` (raises on an error status, e.g. 503 while stopping)."""
        with urllib.request.urlopen(self.url + "/health", timeout=timeout) as response:
            return json.loads(response.read())

    def log(self) -> str:
        """The last lines the server wrote (stdout and stderr)."""
        return "".join(self.output)

    def terminate(self) -> None:
        """SIGTERM to rank 0, without waiting: the server answers what it accepted, then exits."""
        if self.process.poll() is None:
            os.kill(self.rank0_pid, signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        """`terminate()` and wait; the exit code (torchrun's at TP > 1, which sees its ranks exit).
        Raises `TimeoutError` (after killing it) if the server does not exit in `timeout`."""
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"the server did not stop within {timeout:.0f}s:\n{self.log()}") from None
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the server and every process under it (torchrun and its ranks), as a crash would."""
        if self.process.poll() is None:
            try:
                under = psutil.Process(self.process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                under = []
            # Not a killpg: torchrun starts each rank in a session of its own.
            for process in [*under, self.process]:
                try:
                    os.kill(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # exited meanwhile
        self.process.wait()


def _pump(process: subprocess.Popen, server_output: collections.deque, ready: dict, event: threading.Event) -> None:
    """Read the server's output until it closes: keeps the pipe drained (a full pipe would
    block the server), remembers the last lines, and reports the ready line."""
    for line in process.stdout:
        server_output.append(line)
        match = _READY.match(line.strip())
        if match and not event.is_set():
            ready.update(match.groupdict())
            event.set()
    event.set()  # the output ended: the process is gone


def launch(model: Path | str, *, tp: int = 1, port: int = 0, max_logprobs: int = 20, args: Sequence[str] = (),
           env: Optional[dict[str, str]] = None, startup_timeout: float = 300.0) -> TeacherServer:
    """Start a server and return once it prints its ready line; the caller must `stop()` or `kill()` it.

    `env` is added to this process's environment (e.g. `MEGATRON_OPD_DEVICE=cpu`).
    Raises `RuntimeError` with the server's output if it exits or times out first.
    """
    process = subprocess.Popen(
        server_command(model, tp=tp, port=port, max_logprobs=max_logprobs, args=args),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env={**os.environ, **(env or {})}, start_new_session=True)  # a Ctrl-C of the caller is not the server's
    output: collections.deque = collections.deque(maxlen=200)
    ready: dict[str, str] = {}
    event = threading.Event()
    threading.Thread(target=_pump, args=(process, output, ready, event), daemon=True, name="server-output").start()
    event.wait(startup_timeout)
    if not ready:
        server = TeacherServer("", "", process, tp, process.pid, output)
        server.kill()
        reason = f"exited with code {process.returncode}" if event.is_set() else f"not ready in {startup_timeout:.0f}s"
        raise RuntimeError(f"teacher server {reason}:\n{server.log()}")
    server = TeacherServer(ready["url"], ready["name"], process, tp, process.pid, output)
    if tp > 1:
        server.rank0_pid = server.health()["pid"]
    return server


@contextmanager
def start_server(model: Path | str, **kwargs) -> Iterator[TeacherServer]:
    """`launch(model, **kwargs)` as a context manager: on exit, a server still running is
    stopped (SIGTERM to rank 0), and killed if it does not stop."""
    server = launch(model, **kwargs)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            try:
                server.stop()
            except Exception:
                server.kill()
