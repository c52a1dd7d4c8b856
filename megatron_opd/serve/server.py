"""The teacher server: vLLM's OpenAI-style completions API over HTTP, in front of the batch scheduler.

`commands.serve_teacher` (`megatron-opd serve-teacher`) loads the model and runs it.

HTTP is the standard library's `ThreadingHTTPServer`: the CPU path gains no
dependency, and what a web framework would bring, routing and JSON, is a few lines
here, while what this server needs beyond them, batching prompts across concurrent
requests into one forward and keeping the TP ranks in step with broadcasts, no
framework provides. Handler threads validate and queue prompts; the main thread runs
the batches (`serve/scheduler.py`); at TP > 1 rank 0 broadcasts each batch to the
other ranks, which only run the forward (`serve/engine.py`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from megatron_opd.serve.api import ApiError, ServedModel, completion_response, parse_completion_request
from megatron_opd.serve.engine import PromptJob
from megatron_opd.serve.scheduler import BatchScheduler, SchedulerClosed
from megatron_opd.serve.tokenizer import HFTextCodec


class TeacherService:
    """What the HTTP routes do, without HTTP: bodies in, (status, JSON object) out."""

    def __init__(self, served: ServedModel, scheduler: BatchScheduler, codec: Optional[HFTextCodec]):
        self.served, self.scheduler, self.codec = served, scheduler, codec
        self._lock = threading.Lock()
        self.requests = self.errors = 0

    def count(self, status: int) -> None:
        with self._lock:
            self.errors += int(status >= 400)

    def health(self, body: bytes) -> tuple[int, dict[str, Any]]:
        scheduler = self.scheduler
        return (200 if scheduler.accepting else 503), {
            "status": "ok" if scheduler.accepting else "stopping", "pid": os.getpid(),
            "requests": self.requests, "batches": scheduler.batches, "prompts": scheduler.prompts,
            "max_batch_prompts": scheduler.max_batch_prompts, "pending": scheduler.pending,
            "heartbeats": scheduler.heartbeats, "errors": self.errors}

    def models(self, body: bytes) -> tuple[int, dict[str, Any]]:
        return 200, {"object": "list", "data": [self.served.card()]}

    def completions(self, body: bytes) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests += 1
        request = parse_completion_request(body, self.served, self.codec)
        jobs = [PromptJob(token_ids=prompt, prompt_logprobs=request.prompt_logprobs, logprobs=request.logprobs,
                          max_tokens=request.max_tokens, temperature=request.temperature, seed=request.seed)
                for prompt in request.prompts]
        try:
            futures = self.scheduler.submit(jobs)
        except SchedulerClosed as error:
            raise ApiError(503, str(error)) from None
        return 200, completion_response(request, [future.result() for future in futures], self.served, self.codec)


class TeacherHTTPServer(ThreadingHTTPServer):
    """One thread per connection (keep-alive), routes to a `TeacherService`."""

    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not hold up shutdown
    request_queue_size = 1024  # many clients connecting at once must not see refused connections

    def __init__(self, host: str, port: int, max_request_bytes: int):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.max_request_bytes = max_request_bytes
        self.service: Optional[TeacherService] = None
        self.routes: dict[str, dict[str, Callable[[bytes], tuple[int, dict]]]] = {}
        self._active = 0
        self._idle = threading.Condition()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def attach(self, service: TeacherService) -> None:
        self.service = service
        self.routes = {"/health": {"GET": service.health}, "/v1/models": {"GET": service.models},
                       "/v1/completions": {"POST": service.completions}}

    def enter(self) -> None:
        with self._idle:
            self._active += 1

    def leave(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no handler is inside a request; False if `timeout` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection for many requests
    server: TeacherHTTPServer

    def setup(self) -> None:
        super().setup()
        # Headers and body are two writes: without this, Nagle + delayed ACK add ~40 ms each.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: a distillation run sends thousands of requests; errors are counted in /health."""

    def _dispatch(self, method: str) -> None:
        self.server.enter()
        try:
            status, body = self._respond(method)
            self.server.service.count(status)
            self._send_json(status, body)
        finally:
            self.server.leave()

    def _respond(self, method: str) -> tuple[int, dict[str, Any]]:
        try:
            path = urlsplit(self.path).path
            route = self.server.routes.get(path)
            if route is None:
                raise ApiError(404, f"no route {path}: the routes are {sorted(self.server.routes)}")
            if method not in route:
                raise ApiError(405, f"{method} {path} is not allowed: use {' or '.join(route)}")
            return route[method](self._read_body() if method == "POST" else b"")
        except ApiError as error:
            return error.status, error.body()
        except Exception:
            traceback.print_exc(file=sys.stderr)
            return 500, ApiError(500, "internal error: see the server's log").body()

    def _read_body(self) -> bytes:
        """The request body; its size is checked from Content-Length before anything is read."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "chunked request bodies are not supported: send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise ApiError(411, "Content-Length is required")
        if not length.isdigit():
            self.close_connection = True
            raise ApiError(400, f"Content-Length={length!r} is invalid: a non-negative integer")
        if int(length) > self.server.max_request_bytes:
            self.close_connection = True  # the unread body would be parsed as the next request
            raise ApiError(413, f"request body of {int(length)} bytes is larger than the "
                                f"{self.server.max_request_bytes} allowed (--max-request-bytes)")
        return self.rfile.read(int(length))

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", ", ".join(self.server.routes.get(urlsplit(self.path).path, {})))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


# ------------------------------------------------------------------------------ CLI
