"""Ctrl-C during a checkpoint write: held until the write is complete, or, at the second
press, taken at once with nothing half-written left behind."""

import os
import signal
import threading

import pytest

from megatron_opd.checkpoint import megatron_checkpoint
from megatron_opd.checkpoint.megatron_checkpoint import atomic_output_dir
from megatron_opd.runtime.interrupts import deferred_interrupt


def ctrl_c() -> None:
    """What a terminal's Ctrl-C does to this process (the handler runs before this returns)."""
    signal.raise_signal(signal.SIGINT)


def test_ctrl_c_is_held_until_the_block_ends(capfd):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt("writing checkpoint iter_0000004"):
            ctrl_c()
            done.append("the rest of the block")
    assert done == ["the rest of the block"]
    assert "Ctrl-C: finishing writing checkpoint iter_0000004 first" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_stops_at_once():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt("a write"):
            ctrl_c()
            done.append("after the first")
            ctrl_c()
            done.append("after the second")
    assert done == ["after the first"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_ctrl_c_no_interrupt_and_errors_pass_through():
    with deferred_interrupt("a write"):
        pass
    with pytest.raises(ValueError):
        with deferred_interrupt("a write"):
            raise ValueError("the block's own error")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_program_s_own_sigint_handler_is_kept():
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with deferred_interrupt("a write"):
            ctrl_c()
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_off_the_main_thread_the_block_runs_unchanged():
    seen = []
    worker = threading.Thread(target=lambda: seen.append(_enter_and_read_handler()))
    worker.start()
    worker.join()
    assert seen == [signal.default_int_handler]


def _enter_and_read_handler():
    with deferred_interrupt("a write"):
        return signal.getsignal(signal.SIGINT)


def leftovers(directory):
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


def test_ctrl_c_after_the_body_removes_the_temporary_directory(tmp_path, monkeypatch):
    """Ctrl-C while the ranks wait for each other after writing: nothing half-written is
    left, and no `out` appears."""
    def interrupted_barrier():
        raise KeyboardInterrupt

    monkeypatch.setattr(megatron_checkpoint, "_barrier", interrupted_barrier)
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out) as staging:
            (staging / "weights").write_text("new")
    assert leftovers(tmp_path) == [] and not out.exists()


def test_ctrl_c_while_renaming_into_place_finishes_the_rename(tmp_path, monkeypatch):
    """Between moving the old `out` away and renaming the new one in, Ctrl-C would leave
    neither: it is held until `out` holds the new content."""
    real_replace = os.replace
    moves = []

    def replace(source, target):
        real_replace(source, target)
        moves.append(target)
        if len(moves) == 1:  # the old `out` is moved away, the new one not yet in
            ctrl_c()

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "weights").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, force=True) as staging:
            (staging / "weights").write_text("new")
    assert (out / "weights").read_text() == "new"
    assert len(moves) == 2 and leftovers(tmp_path) == []
