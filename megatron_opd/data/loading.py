"""Read the rows of one data file into a `datasets.Dataset`, by file type."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import datasets

# load_dataset builder per file extension; a directory is read with load_from_disk.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ALLOWED = "a .jsonl, .json or .parquet file, or a directory written by datasets' save_to_disk"


def load_rows(path: str, cache_dir: Optional[str] = None) -> datasets.Dataset:
    """The rows of `path` in file order, unformatted (plain Python values per row).

    JSON / parquet go through `datasets.load_dataset`, which converts them to Arrow in
    `cache_dir` (datasets' default cache when None). A JSON file may be JSON lines or one
    array of objects.
    """
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if file.is_dir():
        return _load_saved(file)
    builder = BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise ValueError(f"data file {path!r} has an unknown type {file.suffix!r}: expected {ALLOWED}")
    try:
        rows = datasets.load_dataset(builder, data_files=str(file.resolve()), split="train", cache_dir=cache_dir)
    except Exception as error:  # pyarrow / datasets errors do not name the file
        raise ValueError(f"could not read {path!r} as {builder}: {error}") from error
    return rows


def _load_saved(directory: Path) -> datasets.Dataset:
    try:
        rows = datasets.load_from_disk(str(directory))
    except FileNotFoundError as error:
        raise ValueError(f"data directory {str(directory)!r} is not a saved dataset: expected {ALLOWED}") from error
    if isinstance(rows, datasets.DatasetDict):
        raise ValueError(f"data directory {str(directory)!r} holds a DatasetDict with splits {list(rows)}: "
                         f"give one split's directory, e.g. {str(directory / next(iter(rows), 'train'))!r}")
    # A saved format (e.g. "torch") would hand the tokenizer tensors instead of lists.
    return rows.with_format(None)


__all__ = ["ALLOWED", "BUILDERS", "load_rows"]
