"""Read the rows of one data file into a `datasets.Dataset`, by file type.

A file that cannot be used as a whole raises `DataFileError` naming it, and, for JSON,
the line: datasets' own errors ("An error occurred while generating the dataset", a
pyarrow "row" that counts blocks, a UnicodeDecodeError at tokenization time) do not.
The JSON diagnosis reads the file again in Python, only once something went wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import datasets
import pyarrow as pa

from megatron_opd.data.errors import DataFileError, MissingDataFileError

# load_dataset builder per file extension; a directory is read with load_from_disk.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ALLOWED = "a .jsonl, .json or .parquet file, or a directory written by datasets' save_to_disk"
ROW_EXAMPLE = '{"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}'


def load_rows(path: str, cache_dir: Optional[str] = None) -> datasets.Dataset:
    """The rows of `path` in file order, unformatted (plain Python values per row).

    JSON / parquet go through `datasets.load_dataset`, which converts them to Arrow in
    `cache_dir` (datasets' default cache when None). A JSON file may be JSON lines or one
    array of objects. Raises DataFileError (MissingDataFileError when absent) for a file
    that cannot be read, is not UTF-8, has no rows or rows that are not objects.
    """
    file = Path(path)
    if not file.exists():
        raise MissingDataFileError(path, "data file does not exist; check the path in data.dataset / "
                                         "data.val_dataset")
    if file.is_dir():
        rows = _load_saved(file, path)
        builder = None
    else:
        builder = BUILDERS.get(file.suffix.lower())
        if builder is None:
            kind = repr(file.suffix) if file.suffix else "(no extension)"
            raise DataFileError(path, f"unknown type {kind}: expected {ALLOWED}; convert it, e.g. to JSON lines "
                                      f"(.jsonl) with one object per line such as {ROW_EXAMPLE}")
        if builder == "parquet":
            _check_parquet(file, path)
        try:
            rows = datasets.load_dataset(builder, data_files=str(file.resolve()), split="train",
                                         cache_dir=cache_dir)
        except Exception as error:  # pyarrow / datasets errors name neither the file nor the line
            detail = diagnose_json(file) if builder == "json" else None
            raise DataFileError(path, detail or _unreadable(builder, error)) from error
    if builder == "json" and rows.column_names == ["text"] and _starts_with_array(file):
        # An array of non-objects ([1, 2], ["a", "b"]) is read as one column "text".
        detail = diagnose_json(file)
        if detail is not None:
            raise DataFileError(path, detail)
    if len(rows) == 0:
        raise DataFileError(path, "has no rows; add rows or remove it from the data config")
    _check_utf8(rows, file, path, builder)
    return rows


def _check_parquet(file: Path, path: str) -> None:
    """Read the footer (cheap) so that a damaged or empty file is named before datasets logs
    its own error."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(str(file)).num_rows
    except Exception as error:
        raise DataFileError(path, _unreadable("parquet", error)) from error
    if rows == 0:
        raise DataFileError(path, "has no rows; add rows or remove it from the data config")


def _load_saved(directory: Path, path: str) -> datasets.Dataset:
    try:
        rows = datasets.load_from_disk(str(directory))
    except FileNotFoundError as error:
        raise DataFileError(path, f"this directory is not a saved dataset (no dataset_info.json / state.json): "
                                  f"expected {ALLOWED}") from error
    except Exception as error:  # a damaged save: unreadable arrow or json metadata
        raise DataFileError(path, f"this saved dataset cannot be read ({_root_cause(error)}); save it again "
                                  "with datasets' save_to_disk") from error
    if isinstance(rows, datasets.DatasetDict):
        raise DataFileError(path, f"this directory holds a DatasetDict with splits {list(rows)}: "
                                  f"give one split's directory, e.g. {str(directory / next(iter(rows), 'train'))!r}")
    # A saved format (e.g. "torch") would hand the tokenizer tensors instead of lists.
    return rows.with_format(None)


def _check_utf8(rows: datasets.Dataset, file: Path, path: str, builder: Optional[str]) -> None:
    """Refuse strings that are not UTF-8: pyarrow's JSON reader stores them as they are, and
    they would fail later, when a row is read, as a bare UnicodeDecodeError. A full
    validation runs at several GB/s."""
    table = rows.data.table
    try:
        table.validate(full=True)
        return
    except pa.ArrowInvalid as error:
        problem = str(error)
    detail = diagnose_json(file) if builder == "json" else None
    if detail is None:
        column = next((name for name in table.column_names if not _valid(table.column(name))), None)
        where = f"column {column!r} " if column is not None else ""
        detail = (f"{where}holds text that is not valid UTF-8 ({problem}); write it again with UTF-8 strings"
                  if "utf8" in problem.lower() else f"holds invalid Arrow data ({problem}); write it again")
    raise DataFileError(path, detail)


def _valid(column: pa.ChunkedArray) -> bool:
    try:
        column.validate(full=True)
        return True
    except pa.ArrowInvalid:
        return False


def diagnose_json(file: Path) -> Optional[str]:
    """What is wrong with a JSON / JSON lines file, in the user's terms (the first problem in
    file order, with its 1-based line), or None when nothing is found.

    Checks the encoding (UTF-8), the syntax, that every row is an object and that there
    are rows. A file starting with "[" is one JSON array, parsed whole (as datasets does);
    any other is JSON lines, read line by line.
    """
    with open(file, "rb") as handle:
        head = handle.read(4)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "is UTF-16 (or UTF-32) text, not UTF-8; re-save the file as UTF-8"
    first_char, objects, nonempty, offset = None, 0, 0, 0  # offset: bytes before the current line
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return (f"not UTF-8 text: byte 0x{raw[error.start]:02x} at line {number} (byte {error.start + 1} "
                        f"of the line, offset {offset + error.start} in the file); re-save the file as UTF-8")
            offset += len(raw)
            if number == 1:
                line = line.lstrip("\ufeff")
            stripped = line.strip()
            if not stripped:
                continue
            if first_char is None:
                first_char = stripped[0]
            if first_char == "[":
                continue  # one JSON array: only the encoding is checked line by line
            try:
                value = json.loads(line)  # not `stripped`: the error's column counts from the line's start
            except json.JSONDecodeError as error:
                if objects == 0 and _one_document(file):
                    return None  # one (pretty-printed) object, not JSON lines: valid JSON
                return (f"line {number}, column {error.colno}: invalid JSON ({error.msg}); each line of a "
                        "JSON lines file must be one complete JSON object")
            if not isinstance(value, dict):
                return (f"line {number} is {_kind(value)}, not a JSON object; each row must be one, such as "
                        f"{ROW_EXAMPLE}")
            objects += 1
            nonempty += bool(value)
    if first_char is None:
        what = "has only blank lines" if offset else "is empty"
        return f"has no rows (the file {what}); add rows or remove it from the data config"
    if first_char == "[":
        try:
            value = json.loads(file.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as error:
            return f"line {error.lineno}, column {error.colno}: invalid JSON ({error.msg})"
        if not isinstance(value, list):
            return None
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                return (f"row {index} of the JSON array is {_kind(item)}, not a JSON object; each row must be one, "
                        f"such as {ROW_EXAMPLE}")
        objects, nonempty = len(value), sum(bool(item) for item in value)
    if objects == 0:
        return "has no rows (an empty JSON array); add rows or remove it from the data config"
    if nonempty == 0:
        return f"has no columns: every row is an empty object {{}}; each row needs fields, such as {ROW_EXAMPLE}"
    return None


def _one_document(file: Path, limit: int = 64 << 20) -> bool:
    """Whether a (small) file is a single valid JSON document."""
    if file.stat().st_size > limit:
        return False
    try:
        json.loads(file.read_text(encoding="utf-8-sig"))
        return True
    except ValueError:
        return False


def _starts_with_array(file: Path) -> bool:
    with open(file, "rb") as handle:
        head = handle.read(1 << 16).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return head.startswith("[")


def _kind(value: Any) -> str:
    text = json.dumps(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({text})"
    if isinstance(value, (int, float)):
        return f"a number ({text})"
    if isinstance(value, str):
        return f"a string ({text})"
    return f"an array ({text})"


def _unreadable(builder: str, error: BaseException) -> str:
    cause = _root_cause(error)
    if builder == "parquet":
        return (f"not a readable parquet file ({cause}); write it again, e.g. with datasets' to_parquet or "
                "pandas' DataFrame.to_parquet")
    return (f"could not be read as JSON ({cause}); give JSON lines (one object per line) or one JSON array of "
            "objects, with the same type for a column in every row")


def _root_cause(error: BaseException) -> str:
    """The first message below datasets' generic wrappers ("An error occurred while
    generating the dataset"), which say nothing about the data."""
    seen, current = [], error
    while current is not None and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    useful = [e for e in seen if not isinstance(e, datasets.exceptions.DatasetGenerationError) and str(e)]
    chosen = useful[0] if useful else error
    return f"{type(chosen).__name__}: {chosen}" if str(chosen) else type(chosen).__name__


__all__ = ["ALLOWED", "BUILDERS", "diagnose_json", "load_rows"]
