"""How a command ends on an error: one line saying what is wrong and what to do, no traceback.

    megatron_opd.train: error: data/train.jsonl row 12: 'completion' is an int, expected a string ...

Printed for every `UserError` (a config field, a data row, a checkpoint, a teacher server:
their messages name it), for an OS error about a file (a read-only or full disk, a path
that is a file), and for Ctrl-C. Exit code 1 (130 for Ctrl-C, as a shell reports an
interrupted command). `--debug` or MEGATRON_OPD_DEBUG=1 shows the traceback instead; any
other exception is a bug and always keeps its traceback.

Under torchrun every rank that fails prints its line; ranks other than 0 prefix it with
`[rank N]`, since an error that one rank meets (its disk, its shard) is then told apart
from one every rank meets.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Callable, Optional

from megatron_opd.config.errors import UserError

DEBUG_ENV = "MEGATRON_OPD_DEBUG"

_REMEDY = {
    errno.ENOSPC: "no space left on the device: free space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free space or write elsewhere",
    errno.EACCES: "permission denied: choose a directory you can write (or read), or fix its permissions",
    errno.EPERM: "operation not permitted: choose a directory you can write, or fix its permissions",
    errno.EROFS: "read-only file system: choose a writable directory",
    errno.ENOTDIR: "a part of this path is a file, not a directory",
    errno.EISDIR: "is a directory, expected a file",
    errno.EEXIST: "already exists (a part of this path may be a file, not a directory)",
    errno.ENOENT: "no such file or directory",
}


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (also {DEBUG_ENV}=1)")


def describe(error: BaseException) -> Optional[tuple[str, int]]:
    """(the line, the exit code) for an error a user can act on; None for any other (a bug)."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(error, UserError):
        return str(error), error.exit_code
    if isinstance(error, OSError):
        if error.filename is None:  # ours carry no errno (their text says it); a failed write() no filename
            if error.errno is None:
                return str(error), 1
            return (_REMEDY[error.errno], 1) if error.errno in _REMEDY else None
        path = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
        return f"{path}: {_REMEDY.get(error.errno, error.strerror)}", 1
    return None


def run_command(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """`body()`'s exit code; an error `describe` knows is printed as one line on stderr."""
    try:
        return body()
    except (Exception, KeyboardInterrupt) as error:
        described = describe(error)
        if described is None or debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        line, code = described
        rank = int(os.environ.get("RANK", "0"))
        print(f"{f'[rank {rank}] ' if rank else ''}{prog}: error: {line}", file=sys.stderr, flush=True)
        return code


__all__ = ["DEBUG_ENV", "add_debug_flag", "describe", "run_command"]
