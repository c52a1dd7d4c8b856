"""CPU mode's intra-op threads per rank: MEGATRON_OPD_CPU_THREADS, then OMP_NUM_THREADS, then
the CPUs split over the node's ranks; set by initialize_runtime, shown in the mode line."""

import os

import pytest

from megatron_opd.config import ParallelConfig
from megatron_opd.testing import run_distributed

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_which_setting_wins():
    from megatron_opd.runtime.distributed import cpu_threads_per_rank

    assert cpu_threads_per_rank({}) == (CPUS, f"{CPUS} CPUs / 1 local rank")
    assert cpu_threads_per_rank({"LOCAL_WORLD_SIZE": "2"}) == (max(1, CPUS // 2), f"{CPUS} CPUs / 2 local ranks")
    assert cpu_threads_per_rank({"LOCAL_WORLD_SIZE": str(4 * CPUS)})[0] == 1
    assert cpu_threads_per_rank({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}) == (3, "OMP_NUM_THREADS")
    assert cpu_threads_per_rank({"OMP_NUM_THREADS": "3,2"}) == (3, "OMP_NUM_THREADS")
    assert cpu_threads_per_rank({"OMP_NUM_THREADS": "", "LOCAL_WORLD_SIZE": "1"})[1] == f"{CPUS} CPUs / 1 local rank"
    assert cpu_threads_per_rank({"MEGATRON_OPD_CPU_THREADS": "5", "OMP_NUM_THREADS": "3"}) == (
        5, "MEGATRON_OPD_CPU_THREADS")


@pytest.mark.parametrize("name", ["MEGATRON_OPD_CPU_THREADS", "OMP_NUM_THREADS"])
@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_thread_counts_name_the_variable(name, value):
    from megatron_opd.runtime.distributed import cpu_threads_per_rank

    with pytest.raises(ValueError, match=rf"^{name}='{value}' is invalid: a positive integer"):
        cpu_threads_per_rank({name: value})


def threads_after_initialize(cases: list[dict]) -> list:
    """For each case: set its environment, put torch at 7 threads, initialize_runtime, read the count."""
    import torch

    from megatron_opd.runtime import destroy_runtime, initialize_runtime
    from megatron_opd.runtime.quiet import mode_line
    from megatron_opd.runtime.distributed import cpu_threads_per_rank

    results = []
    for case in cases:
        for name, value in case.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.set_num_threads(7)
        try:
            initialize_runtime(ParallelConfig())
        except ValueError as error:
            results.append(str(error))
            continue
        results.append((torch.get_num_threads(), mode_line("cpu", "gloo", 2, cpu_threads_per_rank())))
    destroy_runtime()
    return results


def test_initialize_runtime_sets_threads_on_two_ranks():
    # run_distributed gives each rank LOCAL_WORLD_SIZE=2 and OMP_NUM_THREADS=cpus//2, as torchrun would.
    cases = [
        {"OMP_NUM_THREADS": None},                                          # the even split
        {"OMP_NUM_THREADS": "3"},                                           # the user's OMP_NUM_THREADS
        {"MEGATRON_OPD_CPU_THREADS": "2"},                                  # ours beats it
        {"MEGATRON_OPD_CPU_THREADS": "lots"},                               # a clear error
    ]
    for rank in run_distributed(threads_after_initialize, 2, cases):
        split, omp, override, bad = rank
        assert split[0] == max(1, CPUS // 2) and f"({CPUS} CPUs / 2 local ranks)" in split[1]
        assert omp[0] == 3 and "3 intra-op threads per rank (OMP_NUM_THREADS)" in omp[1]
        assert override[0] == 2 and "2 intra-op threads per rank (MEGATRON_OPD_CPU_THREADS)" in override[1]
        assert bad.startswith("MEGATRON_OPD_CPU_THREADS='lots' is invalid: a positive integer")
