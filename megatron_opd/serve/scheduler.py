"""Batching across requests on rank 0: HTTP threads queue prompts, one loop runs the batches.

HTTP handler threads `submit` prompts and wait on their futures; `run` (the process's
main thread) takes the first queued prompt, keeps collecting for up to `batch_wait_s`
or until the padded batch `b * s` would pass `max_batch_tokens`, broadcasts the batch,
runs it and resolves the futures. A prompt longer than `max_batch_tokens` runs alone.

The loop runs in the main thread, not a worker thread, for two reasons: CPU mode's
CUDA -> CPU rewrite is a torch function mode, which is thread-local, and signal
handlers run in the main thread, where they only set a flag this loop polls (a handler
must not take the queue's locks, which the interrupted code may hold).

Once a stop is requested, submissions fail with `SchedulerClosed`; the loop then
`close()`s (under the lock submissions take, so none slips in after it), runs and
answers every prompt already accepted, broadcasts STOP and returns.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Optional

from megatron_opd.serve.engine import (
    BATCH,
    HEARTBEAT,
    STOP,
    Batch,
    BatchChannel,
    PromptJob,
    PromptScores,
    TeacherEngine,
)

logger = logging.getLogger(__name__)

POLL_S = 0.05  # how often an idle loop looks at the stop flag


class SchedulerClosed(RuntimeError):
    """The server is shutting down and accepts no more prompts."""


_Item = tuple[PromptJob, Future]


class BatchScheduler:
    """The queue of prompts and the loop that turns it into batches (see module docstring)."""

    def __init__(self, engine: TeacherEngine, channel: BatchChannel, max_batch_tokens: int,
                 batch_wait_s: float, heartbeat_s: float):
        self.engine, self.channel = engine, channel
        self.max_batch_tokens, self.batch_wait_s, self.heartbeat_s = max_batch_tokens, batch_wait_s, heartbeat_s
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._carried: Optional[_Item] = None  # collected but did not fit: starts the next batch
        self._lock = threading.Lock()
        self._closed = False
        self.stop_requested = False  # set by signal handlers: a plain attribute, no lock
        # Written by the loop only, read by /health.
        self.batches = self.prompts = self.max_batch_prompts = self.heartbeats = 0
        self.pending = 0  # prompts accepted and not yet answered (under the lock)

    @property
    def accepting(self) -> bool:
        """False from the moment a stop is requested (even mid-batch, before the loop closes)."""
        return not (self._closed or self.stop_requested)

    def submit(self, jobs: list[PromptJob]) -> list[Future]:
        """Queue the prompts of one request (all or none); a future per prompt resolves to its
        `PromptScores`. Raises `SchedulerClosed` once the server is shutting down."""
        futures = [Future() for _ in jobs]
        with self._lock:
            if not self.accepting:
                raise SchedulerClosed("the server is shutting down")
            for job, future in zip(jobs, futures):
                self._queue.put((job, future))
            self.pending += len(jobs)
        return futures

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def run(self) -> None:
        """Serve batches until a stop is requested and every accepted prompt is answered."""
        last_broadcast = time.monotonic()
        while True:
            if self.stop_requested and not self._closed:
                self.close()
            first = self._next(POLL_S)
            if first is None:
                if self._closed and self._queue.empty():
                    break
                if self.channel.world_size > 1 and time.monotonic() - last_broadcast >= self.heartbeat_s:
                    self.channel.send(HEARTBEAT)
                    self.heartbeats += 1
                    last_broadcast = time.monotonic()
                continue
            self._run_batch(self._collect(first))
            last_broadcast = time.monotonic()
        self.channel.send(STOP)

    def _answered(self, count: int) -> None:
        with self._lock:
            self.pending -= count

    def _next(self, timeout: float) -> Optional[_Item]:
        if self._carried is not None:
            item, self._carried = self._carried, None
            return item
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _collect(self, first: _Item) -> list[_Item]:
        items, longest = [first], len(first[0].token_ids)
        deadline = time.monotonic() + self.batch_wait_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                return items
            length = max(longest, len(item[0].token_ids))
            if (len(items) + 1) * length > self.max_batch_tokens:
                self._carried = item
                return items
            items.append(item)
            longest = length

    def _run_batch(self, items: list[_Item]) -> None:
        batch = Batch.from_jobs([job for job, _ in items])
        try:
            self.channel.send(BATCH, batch)
            results: list[PromptScores] = self.engine.run(batch)
        except Exception as error:
            self._answered(len(items))
            for _, future in items:
                future.set_exception(error)
            if self.channel.world_size > 1:
                raise  # the other ranks may be inside a collective this rank left: not recoverable
            logger.exception("batch of %d prompts failed", len(items))
            return
        self._answered(len(items))
        for (_, future), result in zip(items, results):
            future.set_result(result)
        self.batches += 1
        self.prompts += len(items)
        self.max_batch_prompts = max(self.max_batch_prompts, len(items))
