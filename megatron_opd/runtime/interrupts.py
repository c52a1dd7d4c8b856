"""Ctrl-C held back while a checkpoint is written.

A training checkpoint is a collective write followed by renames (`atomic_output_dir`,
then the `latest` pointer). Ctrl-C lands wherever the main thread happens to be: inside
dist-checkpointing's file writes, between the write and the rename, or between moving an
old directory away and renaming the new one in. Each is recoverable, but each leaves
something behind to clean up, and the user loses the checkpoint that was almost done.
`deferred_interrupt` lets the block finish and raises `KeyboardInterrupt` right after it,
so the run stops with that checkpoint complete and named as the latest. A second Ctrl-C
during the block is taken at once: a user who insists gets the old behaviour (the
temporary directory is then removed by `atomic_output_dir`'s own clean-up).

Only SIGINT, only on the main thread (Python runs signal handlers there; elsewhere the
block runs unchanged), and only when the handler in place is Python's default one
(`KeyboardInterrupt`): a program that installed its own, or ignores SIGINT, keeps it.
SIGTERM and SIGKILL are not held: a scheduler's kill must stay a kill.

This module imports only the standard library.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def deferred_interrupt(what: str) -> Iterator[None]:
    """Run the block with Ctrl-C held; raise `KeyboardInterrupt` after it if one came.

    `what` names the block in the one line printed when Ctrl-C is held ("writing
    checkpoint iter_0000004").
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received: list[int] = []

    def hold(signum, frame) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        print(f"Ctrl-C: finishing {what} first, then stopping (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt
