"""One rank fails, every rank raises: agreement on failure before the next collective.

A step runs work on some ranks only (the rank that asks a teacher server, the rank that
calls the reward functions). If it fails there and the others went on to their next
collective, they would wait for it forever. So the outcome is all-reduced first: the
failing rank raises its own error, every other rank an error pointing to it.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def run_agreed(work: Callable[[], T], *, runs_here: bool, catch: tuple[type[BaseException], ...],
               elsewhere: Callable[[], BaseException], device: torch.device,
               group: Optional[dist.ProcessGroup] = None) -> Optional[T]:
    """`work()` where `runs_here` (None elsewhere). Collective over `group` (default: the world):
    if `work` raised one of `catch` on any rank, that rank re-raises it and the others raise
    `elsewhere()`. Other exceptions are bugs and propagate at once, as any crash does."""
    error: Optional[BaseException] = None
    result = None
    if runs_here:
        try:
            result = work()
        except catch as caught:
            error = caught
    failed = torch.tensor([float(error is not None)], device=device)
    dist.all_reduce(failed, group=group)
    if error is not None:
        raise error
    if failed.item() > 0:
        raise elsewhere()
    return result
