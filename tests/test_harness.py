"""The multi-process harness returns each rank's result and reports failures usefully."""

import time

import pytest
import torch
import torch.distributed as dist

from megatron_opd.testing import DistributedTestError, run_distributed


def sum_of_ranks() -> dict:
    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(total)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": total}


def rank_one_raises() -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("bad shard on rank one")
    dist.barrier()  # rank 0 waits here for a peer that is gone


def sleeps_forever() -> None:
    while True:
        time.sleep(0.1)


def test_returns_each_ranks_result_in_rank_order():
    results = run_distributed(sum_of_ranks, 4)
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert all(r["world"] == 4 and r["sum"].item() == 6.0 for r in results)


def test_failing_rank_traceback_is_shown_and_stuck_peer_is_killed():
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as error:
        run_distributed(rank_one_raises, 2, timeout=60)
    message = str(error.value)
    assert "rank 1 raised" in message and "ValueError: bad shard on rank one" in message
    assert "rank_one_raises" in message
    assert time.monotonic() - start < 30  # did not wait for the timeout


def test_timeout_dumps_the_stacks_of_hung_ranks():
    with pytest.raises(DistributedTestError) as error:
        run_distributed(sleeps_forever, 2, timeout=3)
    message = str(error.value)
    assert "timed out after 3s" in message
    assert "rank 0 was still running" in message and "sleeps_forever" in message


def test_world_size_is_checked():
    with pytest.raises(ValueError, match="world_size=0"):
        run_distributed(sum_of_ranks, 0)


def write_pid_and_sleep(path: str) -> None:
    import os

    with open(path, "w") as handle:
        handle.write(str(os.getpid()))
    sleeps_forever()


def test_ranks_end_when_the_caller_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    pid_file = tmp_path / "rank.pid"
    caller = subprocess.Popen(
        [sys.executable, "-c",
         "from megatron_opd.testing import run_distributed\n"
         "from tests.test_harness import write_pid_and_sleep\n"
         f"run_distributed(write_pid_and_sleep, 1, {str(pid_file)!r}, timeout=120)\n"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and caller.poll() is None, "the rank never started"
        time.sleep(0.1)
    rank_pid = int(pid_file.read_text())
    caller.send_signal(signal.SIGKILL)
    caller.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:  # gone, or a zombie nobody has reaped yet (state Z)
            state = open(f"/proc/{rank_pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.2)
    os.kill(rank_pid, signal.SIGKILL)
    raise AssertionError("the rank outlived its caller")
