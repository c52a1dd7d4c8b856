"""Test utilities shipped with the package so every test suite (ours, users') can use them."""

from megatron_opd.testing.multiprocess import DistributedTestError, run_distributed

__all__ = ["DistributedTestError", "run_distributed"]
