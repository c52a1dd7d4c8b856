"""What the checkpoint room raises about a user's files: one line naming the file or directory
and what to do (printed without a traceback by the commands, as every `UserError`).

Each class also derives from the built-in exception the code raised before (FileNotFoundError,
FileExistsError, ValueError), so a caller that catches those still does.
"""

from __future__ import annotations

from megatron_opd.config.errors import UserError


class CheckpointError(UserError):
    """A model directory, checkpoint or output directory that cannot be read or written as it is."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint that does not fit what loads it (another model shape, another optimizer):
    the commands print it in one line."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A model directory, a checkpoint or one of its files is not there."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A file of a model directory or checkpoint is truncated or unreadable."""


class OutputExistsError(CheckpointError, FileExistsError):
    """An output directory already holds something and replacing it was not asked for."""


class OutputDirError(CheckpointError):
    """An output directory cannot be created or written: permissions, a read-only file system,
    a file where a directory must be, a full disk."""


__all__ = ["CheckpointError", "CheckpointMismatchError", "CheckpointNotFoundError", "CorruptCheckpointError",
           "OutputDirError", "OutputExistsError"]
