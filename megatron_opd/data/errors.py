"""Errors of the data pipeline: a bad row names its file and 0-based row index, a bad
file (unreadable, not UTF-8, no rows, no usable columns) names the file and, where it
can, the line. All are `UserError`s: the entry points print them as one line."""

from __future__ import annotations

from megatron_opd.config.errors import UserError

# Why a row was skipped (the keys of `DataStats.rows_skipped`).
NO_FORMAT = "no_format"  # neither `messages` nor `prompt`, or both
BAD_TYPE = "bad_type"  # a column or message of the wrong type, or an empty prompt
BAD_ROLE = "bad_role"  # a role other than system / user / assistant
BAD_CONTENT = "bad_content"  # message content that is not a string
BAD_ORDER = "bad_order"  # starts with an assistant turn, or turns after the last assistant turn
EMPTY_RESPONSE = "empty_response"  # no response, or an empty one
TEMPLATE_ERROR = "template_error"  # the chat template refused the conversation
FULLY_TRUNCATED = "fully_truncated"  # "right": the prompt alone fills max_length
TOO_LONG = "too_long"  # "delete": longer than max_length (dropped by design, not malformed)


class DataError(UserError, ValueError):
    """A malformed row: `file`, 0-based `row`, a `reason` code (above) and what is wrong."""

    def __init__(self, file: str, row: int, reason: str, detail: str) -> None:
        self.file, self.row, self.reason, self.detail = file, row, reason, detail
        super().__init__(f"{file} row {row}: {detail} [{reason}]")

    def __reduce__(self):  # tokenization workers (num_proc > 1) send it back pickled
        return type(self), (self.file, self.row, self.reason, self.detail)


class DataFileError(UserError, ValueError):
    """A data file or directory that cannot be used as a whole: `file` and `detail`, what is
    wrong and what to do."""

    def __init__(self, file: str, detail: str) -> None:
        self.file, self.detail = file, detail
        super().__init__(f"{file}: {detail}")

    def __reduce__(self):
        return type(self), (self.file, self.detail)


class MissingDataFileError(DataFileError, FileNotFoundError):
    """A data path that does not exist."""


class TemplateError(UserError, ValueError):
    """The tokenizer's chat template cannot delimit assistant turns (never skipped: it would
    hit most rows, so it is a tokenizer problem, not a data problem)."""


class RowProblem(Exception):
    """Raised while encoding one row; the builder turns it into a DataError or a skip,
    adding the file and row it knows. `always_skip`: dropped even without skip_bad_rows."""

    def __init__(self, reason: str, detail: str, always_skip: bool = False) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.always_skip = reason, detail, always_skip

    def __reduce__(self):
        return type(self), (self.reason, self.detail, self.always_skip)


__all__ = ["DataError", "DataFileError", "MissingDataFileError", "RowProblem", "TemplateError"]
