"""Progress of long loops (per tensor, per sampled position), printed by global rank 0 on stderr."""

from __future__ import annotations

import os
import sys
import time


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def byte_amount(size: int) -> str:
    """`512 B`, `3.4 MiB`, `5.60 GiB`."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{size} B"


def log(message: str) -> None:
    if is_rank_zero():
        print(message, file=sys.stderr, flush=True)


class Progress:
    """`[k/N] name` on one rewritten line on a terminal, a line per 10% otherwise."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def __call__(self, name: str) -> None:
        self.done += 1
        if not is_rank_zero():
            return
        line = f"{self.label} [{self.done}/{self.total}] {name}"
        if self.tty:
            print(f"\r\033[K{line}", end="" if self.done < self.total else "\n", file=sys.stderr, flush=True)
        elif self.done * 10 // self.total != (self.done - 1) * 10 // self.total or self.done == self.total:
            print(line, file=sys.stderr, flush=True)

    def finish(self) -> None:
        log(f"{self.label}: {self.done} tensors in {time.monotonic() - self.start:.1f}s")


class Heartbeat:
    """A line every `interval_s` seconds while a loop of unknown duration runs (sampling a batch
    of responses can take minutes at real shapes): `label: <detail>, <elapsed>s`. Silent for
    loops shorter than `interval_s`, so short runs' logs stay as they are."""

    def __init__(self, label: str, interval_s: float = 30.0):
        self.label, self.interval_s = label, interval_s
        self.start = self.last = time.monotonic()

    def __call__(self, detail: str) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            log(f"{self.label}: {detail}, {now - self.start:.0f}s")
