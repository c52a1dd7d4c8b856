"""A user's mistakes, through `python -m megatron_opd.train` as a user runs it: exit code 1,
one line `megatron_opd.train: error: ...` naming the file / row / field and the fix, no
traceback, and nothing written (or the previous checkpoints untouched). `--debug` shows the
traceback. The messages themselves are tested where they are raised (test_data_errors,
test_checkpoint_errors, test_resume_changes); this is the entry point around them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gkd_setup import make_gkd_setup, overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return make_gkd_setup(tmp_path_factory.mktemp("cli_errors"))


def train(setup: dict, out: Path, *extra: str, **fields) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "megatron_opd.train", *overrides(setup, out, **fields), *extra]
    environ = {key: value for key, value in os.environ.items() if key != "MEGATRON_OPD_DEBUG"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**environ, "MEGATRON_OPD_DEVICE": "cpu"})


def one_line_error(completed: subprocess.CompletedProcess) -> str:
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron_opd.train: error: "), completed.stderr[-3000:]
    return last


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def bad_data(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (data file, what the error line must say)."""
    row = b'{"prompt": "w1 w2", "completion": "w3"}\n'
    return {
        "latin-1": (write(tmp_path / "latin1.jsonl", row * 3 + '{"prompt": "caf\xe9", "completion": "w3"}\n'.encode(
            "latin-1")), "not UTF-8 text: byte 0xe9 at line 4"),
        "empty": (write(tmp_path / "empty.jsonl", b""), "has no rows"),
        "columns": (write(tmp_path / "qa.jsonl", b'{"question": "w1", "answer": "w2"}\n' * 9),
                    "its columns are ['question', 'answer']"),
        "int completion": (write(tmp_path / "int.jsonl", row * 2 + b'{"prompt": "w1", "completion": 3}\n'),
                           "row 2: completion must be a string"),
        "too long": (write(tmp_path / "long.jsonl", row + b'{"prompt": "' + b" ".join([b"w5"] * 40)
                           + b'", "completion": "w3"}\n'), "row 1: the prompt alone has"),
        "txt": (write(tmp_path / "rows.txt", b"w1 w2\n"), "unknown type '.txt'"),
    }


# One in the default suite; the others (each a ~6 s process) in the slow one.
@pytest.mark.parametrize("case", ["latin-1", *(pytest.param(case, marks=pytest.mark.slow) for case in
                                               ("empty", "columns", "int completion", "too long", "txt"))])
def test_bad_data_is_one_line(setup, tmp_path, case):
    data, expected = bad_data(tmp_path)[case]
    out = tmp_path / "out"
    line = one_line_error(train(setup, out, **{"data.dataset": f"[{data}]", "data.val_dataset": "[]"}))
    assert data in line and expected in line, line
    assert not out.exists(), "a failed start wrote into the output dir"


def test_missing_teacher_names_the_field(setup, tmp_path):
    out = tmp_path / "out"
    line = one_line_error(train(setup, out, teacher_model=str(tmp_path / "nowhere")))
    assert "teacher_model=" in line and "nowhere" in line, line
    assert not out.exists()


@pytest.mark.slow
def test_output_dir_under_a_file(setup, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    line = one_line_error(train(setup, tmp_path / "file" / "out"))
    assert str(tmp_path / "file") in line and "a part of this path is a file" in line, line


@pytest.mark.slow
def test_debug_shows_the_traceback(setup, tmp_path):
    completed = train(setup, tmp_path / "out", "--debug", teacher_model=str(tmp_path / "nowhere"))
    assert completed.returncode != 0 and "Traceback" in completed.stderr


def test_os_errors_are_described_by_errno():
    from megatron_opd.commands.errors import describe

    assert describe(OSError(errno.ENOSPC, "No space left on device", "/ckpt/x")) == (
        "/ckpt/x: no space left on the device: free space or write elsewhere", 1)
    assert describe(PermissionError(errno.EACCES, "Permission denied", "/ro/out"))[0].startswith(
        "/ro/out: permission denied")
    assert describe(OSError(errno.EROFS, "Read-only file system", "/ro"))[0] == (
        "/ro: read-only file system: choose a writable directory")
    assert describe(OSError(errno.ENOSPC, "No space left on device"))[0].startswith("no space left")
    assert describe(FileNotFoundError("config file x.yaml does not exist")) == (
        "config file x.yaml does not exist", 1)
    assert describe(KeyboardInterrupt()) == ("interrupted", 130)
    assert describe(RuntimeError("a bug")) is None and describe(KeyError("k")) is None


@pytest.mark.slow  # ~15 s: a run, then the refused resume
def test_refused_resume_leaves_the_checkpoints_as_they_were(setup, tmp_path):
    out = tmp_path / "out"
    assert train(setup, out).returncode == 0
    before = {str(path): path.stat().st_mtime_ns for path in out.rglob("*")}
    metrics = (out / "metrics.jsonl").read_text()
    line = one_line_error(train(setup, out, beta=0.2))
    assert "beta: 0.5 -> 0.2" in line and "training.resume_allow_changes=[beta]" in line
    assert {str(path): path.stat().st_mtime_ns for path in out.rglob("*")} == before
    assert (out / "metrics.jsonl").read_text() == metrics
    assert [json.loads(line)["step"] for line in metrics.splitlines()] == [1, 2]
    shutil.rmtree(out)
