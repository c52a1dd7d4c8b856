"""Fingerprints of the files a run reads (model weights, data files): did they change?

A resumed run compares the fingerprints its checkpoint recorded with those of the files
it is given now (`trainer/resume_check.py`), so that another model of the same shape, or
another dataset of the same length, is refused rather than silently continued.

Hashing every byte would cost seconds per GB at every start (a 7B teacher is 15 GB), so
a file over `WHOLE_FILE_BYTES` is fingerprinted by its size and `SAMPLES` evenly spaced
blocks of `BLOCK_BYTES`, its first and last included. Weights that differ (another
random init, another fine-tune) differ in every block; a safetensors or Arrow header,
which records each tensor's shape and offset, is in the first block. An edit of a few
bytes in the middle of a large file can escape it, which is not the failure this
guards against.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

BLOCK_BYTES = 64 * 1024
SAMPLES = 16
WHOLE_FILE_BYTES = SAMPLES * BLOCK_BYTES


def _file_digest(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{size}\n".encode())
    with open(path, "rb") as handle:
        if size <= WHOLE_FILE_BYTES:
            digest.update(handle.read())
            return
        last = size - BLOCK_BYTES
        for index in range(SAMPLES):
            handle.seek(last * index // (SAMPLES - 1))
            digest.update(handle.read(BLOCK_BYTES))


def path_fingerprint(path: str | os.PathLike) -> str:
    """A hex digest of a file, or of a directory's files (names relative to it, sizes and
    sampled contents; hidden files and directories skipped). Raises FileNotFoundError."""
    root = Path(path)
    digest = hashlib.sha256()
    if root.is_file():
        _file_digest(root, digest)
        return digest.hexdigest()
    if not root.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    files = sorted(file for file in root.rglob("*")
                   if file.is_file() and not any(part.startswith(".") for part in file.relative_to(root).parts))
    for file in files:
        digest.update(f"{file.relative_to(root).as_posix()}\n".encode())
        _file_digest(file, digest)
    return digest.hexdigest()


def text_fingerprint(*parts: str) -> str:
    """A hex digest of strings (e.g. a tokenizer's vocabulary, written out in a fixed order)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


__all__ = ["path_fingerprint", "text_fingerprint"]
