"""Runs against a teacher served over HTTP (ours or vLLM), and the same teacher in process.

Used by test_server_teacher (`megatron-opd serve-teacher`) and test_vllm_teacher (`vllm serve`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.gkd_setup import make_gkd_setup, overrides

K = 5  # gkd_logits_topk of the runs
SERVER_ENV = {"MEGATRON_OPD_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}


def served_teacher_setup(root: Path, teacher_family: str = "llama2") -> dict:
    """`make_gkd_setup` plus `served_teacher`: the teacher with the run's tokenizer beside it,
    as a real teacher directory has (vLLM needs one to start)."""
    setup = make_gkd_setup(root, teacher_family=teacher_family)
    served = Path(setup["teacher"]).with_name("teacher_with_tokenizer")
    shutil.copytree(setup["teacher"], served)
    for name in os.listdir(setup["tokenizer"]):
        shutil.copy(Path(setup["tokenizer"]) / name, served / name)
    setup["served_teacher"] = str(served)
    return setup


def served(url: str, **fields) -> dict:
    """Overrides of a run whose teacher is the server at `url` (top-K = K, no retries)."""
    return {"teacher_model": "null", "teacher_model_server": url, "gkd_logits_topk": K,
            "teacher_server.max_retries": 0, "teacher_server.verify_tokenizer": "false", **fields}


def cache_on_rank(argv: list[str]) -> int:
    from megatron_opd.commands.cache_teacher import main

    return main(argv)


def cache_argv(setup: dict, out: Path, tmp_path: Path, **fields) -> list[str]:
    """`megatron-opd cache-teacher` of the setup's data with K=8 into `out`."""
    return ["--out", str(out), *overrides(setup, tmp_path / "unused", gkd_logits_topk=8, **fields)]


def assert_same_cache(table_dir: Path, reference_dir: Path, atol: float) -> None:
    """Two teacher caches of the same data: equal top-K ids, top-K and token log-probs within
    `atol`, at every 7th row of each split."""
    import numpy as np
    from datasets import load_from_disk

    for split, rows in (("train", 64), ("val", 16)):
        reference = load_from_disk(str(reference_dir / split)).with_format("numpy")
        table = load_from_disk(str(table_dir / split)).with_format("numpy")
        assert len(reference) == len(table) == rows
        for row in range(0, rows, 7):
            assert np.array_equal(table[row]["topk_ids"], reference[row]["topk_ids"]), (split, row)
            np.testing.assert_allclose(table[row]["topk_logprobs"], reference[row]["topk_logprobs"], atol=atol)
            np.testing.assert_allclose(table[row]["token_logprobs"], reference[row]["token_logprobs"], atol=atol)
