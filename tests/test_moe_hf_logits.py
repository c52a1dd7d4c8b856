"""Mixture-of-experts models loaded from HF directories compute what HF transformers computes.

Qwen3-MoE, Qwen2-MoE and Mixtral (tests/moe_models.py: 8 experts, top-2, a dense layer
among MoE layers, a gated shared expert), HF weights converted on load, Megatron's
forward at EP=1, EP=2 (2 ranks), TP=2 (experts split over expert-TP 2), and TP=2 x EP=2
(4 ranks, slow), logits gathered over TP against `transformers`' float32 eager forward.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.config import ParallelConfig
from megatron_opd.testing import run_distributed
from tests.hf_models import VOCAB, hf_logits
from tests.moe_models import make_moe_hf_model, moe_family_configs
from tests.test_hf_logits import megatron_logits_on_rank
from tests.tiny_models import scaled_diff

FAMILIES = list(moe_family_configs())
SEQ_LENGTH = 48
# (tp, ep, world size)
LAYOUTS = [(1, 1, 1), (1, 2, 2), (2, 1, 2), pytest.param(2, 2, 4, marks=pytest.mark.slow)]
PP_LAYOUTS = [(2, 1, 2), pytest.param(2, 2, 4, marks=pytest.mark.slow)]  # (pp, ep, world size)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_moe")
    return {family: make_moe_hf_model(family, root / family, seed=10 + index)
            for index, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, SEQ_LENGTH + 1), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def expected(hf_dirs, tokens):
    return {family: hf_logits(directory, tokens[:, :-1]) for family, directory in hf_dirs.items()}


@pytest.mark.parametrize("tp,ep,world", LAYOUTS)
def test_moe_logits_match_hf_transformers(hf_dirs, tokens, expected, tp, ep, world):
    parallel = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    results = run_distributed(megatron_logits_on_rank, world, hf_dirs, parallel, tokens, timeout=300)
    for family in hf_dirs:
        megatron = next(r[family]["logits"] for r in results if r[family]["logits"] is not None)
        assert expected[family].abs().max() > 3.0, f"{family}: logits too small to test a layout"
        diff = scaled_diff(megatron[..., :VOCAB], expected[family])
        assert diff < 1e-4, f"{family} at tp={tp} ep={ep}: scaled logit diff {diff:.2e}"


@pytest.mark.parametrize("pp,ep,world", PP_LAYOUTS)
def test_moe_logits_match_hf_transformers_under_pp(hf_dirs, tokens, expected, pp, ep, world):
    """Each stage builds its own layers' MoE / dense specs (Qwen's dense layer on one stage)."""
    parallel = ParallelConfig(pipeline_model_parallel_size=pp, expert_model_parallel_size=ep)
    results = run_distributed(megatron_logits_on_rank, world, hf_dirs, parallel, tokens, timeout=300)
    for family in hf_dirs:
        megatron = next(r[family]["logits"] for r in results if r[family]["logits"] is not None)
        diff = scaled_diff(megatron[..., :VOCAB], expected[family])
        assert diff < 1e-4, f"{family} at pp={pp} ep={ep}: scaled logit diff {diff:.2e}"
