"""initialize_runtime: device choice, Megatron's groups, errors for impossible layouts."""

import os

import pytest
import torch

from megatron_opd.config import ParallelConfig
from megatron_opd.runtime import resolve_device
from megatron_opd.testing import DistributedTestError, run_distributed


def describe_rank(parallel: ParallelConfig, drop_torchrun_env: bool = False) -> dict:
    from megatron.core import parallel_state

    from megatron_opd.runtime import cpu_mode, destroy_runtime, initialize_runtime

    if drop_torchrun_env:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(name)
    runtime = initialize_runtime(parallel)
    again = initialize_runtime(parallel)  # idempotent for the same layout
    info = {
        "rank": runtime.rank, "backend": runtime.backend, "device": str(runtime.device),
        "cpu_mode": cpu_mode.is_installed(), "dp": runtime.data_parallel_size,
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "same": again == runtime,
    }
    if parallel.model_parallel_size > 1:
        try:
            initialize_runtime(ParallelConfig())
        except RuntimeError as error:
            info["relayout_error"] = str(error)
    destroy_runtime()
    return info


def test_tp2_pp2_on_four_ranks():
    ranks = run_distributed(describe_rank, 4, ParallelConfig(tensor_model_parallel_size=2,
                                                             pipeline_model_parallel_size=2))
    for rank, info in enumerate(ranks):
        assert info["backend"] == "gloo" and info["device"] == "cpu" and info["cpu_mode"]
        assert info["dp"] == 1 and info["same"]
        # Megatron orders ranks tp-fastest: rank = pp_rank * tp + tp_rank.
        assert (info["tp_rank"], info["pp_rank"]) == (rank % 2, rank // 2)
        assert "already initialized with (tp, pp, ep, etp)=(2, 2, 1, 2)" in info["relayout_error"]


def test_data_parallel_remainder():
    ranks = run_distributed(describe_rank, 4, ParallelConfig(tensor_model_parallel_size=2))
    assert [info["dp"] for info in ranks] == [2, 2, 2, 2]


def test_single_process_without_torchrun():
    (info,) = run_distributed(describe_rank, 1, ParallelConfig(), drop_torchrun_env=True)
    assert info["rank"] == 0 and info["dp"] == 1


def test_layout_that_does_not_divide_the_world_is_refused():
    with pytest.raises(DistributedTestError, match="a divisor of the world size 2"):
        run_distributed(describe_rank, 2, ParallelConfig(tensor_model_parallel_size=4))


@pytest.mark.parametrize("cuda", [False, True], ids=["without_gpu", "with_gpu"])
def test_resolve_device(monkeypatch, cuda):
    """Both machines on any machine (torch's CUDA check is set each way): an explicit choice
    wins over the machine, auto follows it, and CUDA asked for without a GPU is an error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv("MEGATRON_OPD_DEVICE", "tpu")
    with pytest.raises(ValueError, match="MEGATRON_OPD_DEVICE='tpu' is invalid"):
        resolve_device()
    monkeypatch.setenv("MEGATRON_OPD_DEVICE", "cpu")
    assert resolve_device() == "cpu"
    monkeypatch.setenv("MEGATRON_OPD_DEVICE", "auto")
    assert resolve_device() == ("cuda" if cuda else "cpu")
    monkeypatch.delenv("MEGATRON_OPD_DEVICE")
    assert resolve_device() == ("cuda" if cuda else "cpu")
    assert resolve_device("cpu") == "cpu"
    if cuda:
        assert resolve_device("cuda") == "cuda"
    else:
        with pytest.raises(RuntimeError, match="sees no CUDA device"):
            resolve_device("cuda")


def _tokenize_slowly_with_short_collective_timeout(rows_file: str, tokenizer_dir: str, delay_s: float) -> int:
    """Rank 0 takes `delay_s` longer to tokenize than the process group's timeout allows a
    collective to wait; the other rank must still get the dataset."""
    import datetime
    import time

    from transformers import AutoTokenizer

    from megatron_opd.config.data import DataConfig
    from megatron_opd.data import build as data_build
    from megatron_opd.data import tokenized_split
    from megatron_opd.runtime import initialize_runtime

    runtime = initialize_runtime(ParallelConfig(), timeout=datetime.timedelta(seconds=delay_s / 4))
    build = data_build.build_dataset

    def slow_build(*args, **kwargs):
        if runtime.local_rank == 0:
            time.sleep(delay_s)
        return build(*args, **kwargs)

    data_build.build_dataset = slow_build
    config = DataConfig(dataset=[rows_file], prompt_format="raw", max_length=32)
    return len(tokenized_split(config, AutoTokenizer.from_pretrained(tokenizer_dir), "train", runtime))


def test_ranks_wait_for_tokenization_longer_than_the_collective_timeout(tmp_path):
    """Tokenizing a large dataset on rank 0 outlasts NCCL's / gloo's collective timeout; the
    others wait on the host-wait group (hours) instead. Here the group timeout is 1 s and
    tokenizing takes 4 s longer on rank 0: the wait on the default group would fail."""
    from tests.gkd_setup import write_dataset
    from tests.hf_models import make_tokenizer

    make_tokenizer(tmp_path / "tokenizer")
    rows = write_dataset(tmp_path / "rows.jsonl", 12, seed=0)
    lengths = run_distributed(_tokenize_slowly_with_short_collective_timeout, 2, str(rows),
                              str(tmp_path / "tokenizer"), 4.0, timeout=120)
    assert lengths == [12, 12]
