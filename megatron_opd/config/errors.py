"""Errors a user can fix, and the one class every entry point prints without a traceback.

A `UserError` says what is wrong in the user's own terms: the config field, the data
file and row, the checkpoint or server, and what to do. The commands print its message
as one line and exit non-zero (`commands/errors.py`); a traceback is shown only with
`--debug` or MEGATRON_OPD_DEBUG=1. Any other exception is a bug of ours (or of a
library) and keeps its traceback.

Each room defines its own subclass next to the code that raises it (ConfigError here,
DataError in data, CheckpointMismatchError in checkpoint, TeacherServerError in
teachers, ...); this module is the root they share, at the bottom so every room can
reach it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's config, data, files or environment, explained by its message."""

    exit_code = 1


class Interrupted(UserError):
    """The user stopped the run (Ctrl-C / SIGINT); the message says what is kept and how to go on."""

    exit_code = 130  # 128 + SIGINT, as a shell reports a command it interrupted


class ConfigError(UserError, ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


__all__ = ["ConfigError", "Interrupted", "UserError"]
