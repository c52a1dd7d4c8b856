"""A Megatron model loaded from an HF directory computes what HF transformers computes.

For every supported family and TP in {1, 2} x PP in {1, 2}: HF weights converted on
load (in memory), Megatron's pipeline schedule forward, logits gathered over TP, against
`transformers`' own float32 forward of the same directory. 80-token sequences, a vocab
of 300 that Megatron pads to 384 / 512.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.config import ParallelConfig
from megatron_opd.testing import run_distributed
from tests.hf_models import VOCAB, family_configs, hf_logits, make_hf_model
from tests.tiny_models import scaled_diff

FAMILIES = list(family_configs())
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
SEQ_LENGTH = 80


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: make_hf_model(family, root / family, seed=index) for index, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def tokens():
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (2, SEQ_LENGTH + 1), generator=generator)


def megatron_logits_on_rank(directories: dict, parallel: ParallelConfig, tokens: torch.Tensor) -> dict:
    """Per family: full logits on the last stage's first TP rank, and the RoPE frequencies."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_opd.checkpoint import load_pretrained
    from megatron_opd.runtime import initialize_runtime
    from megatron_opd.pipeline import lm_forward_backward

    runtime = initialize_runtime(parallel)
    report = {}
    for family, directory in directories.items():
        model = load_pretrained(directory, runtime, role="teacher")
        captured = []
        lm_forward_backward(model, tokens[None], forward_only=True, on_logits=lambda logits: captured.append(
            gather_from_tensor_model_parallel_region(logits).detach().clone()))
        keep = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        report[family] = {
            "logits": captured[0] if keep else None,
            "padded_vocab": model.vocab_size,
            "inv_freq": model.rotary_pos_emb.inv_freq.clone(),
        }
    return report


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{tp}_pp{pp}" for tp, pp in LAYOUTS])
def test_megatron_logits_match_hf_transformers(hf_dirs, tokens, tp, pp):
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    results = run_distributed(megatron_logits_on_rank, tp * pp, hf_dirs, parallel, tokens, timeout=300)
    for family, directory in hf_dirs.items():
        megatron = next(r[family]["logits"] for r in results if r[family]["logits"] is not None)
        padded = results[0][family]["padded_vocab"]
        assert padded == (384 if tp == 1 else 512) and megatron.shape[-1] == padded, family
        expected = hf_logits(directory, tokens[:, :-1])
        assert expected.abs().max() > 3.0, f"{family}: logits too small to test a layout"
        diff = scaled_diff(megatron[..., :VOCAB], expected)
        assert diff < 1e-4, f"{family} at tp={tp} pp={pp}: scaled logit diff {diff:.2e}"


def test_llama3_rope_scaling_matches_hf(hf_dirs):
    """Short sequences barely see the llama3 scaling, so check the frequencies themselves."""
    from transformers import AutoModelForCausalLM

    results = run_distributed(megatron_logits_on_rank, 1, {"llama3.1": hf_dirs["llama3.1"]},
                              ParallelConfig(), torch.zeros(1, 3, dtype=torch.long))
    megatron = results[0]["llama3.1"]["inv_freq"]
    hf = AutoModelForCausalLM.from_pretrained(hf_dirs["llama3.1"]).model.rotary_emb.inv_freq
    plain = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    assert ((hf - plain).abs() / plain).max() > 0.5, "the test config must make the scaling visible"
    torch.testing.assert_close(megatron, hf, rtol=1e-6, atol=0)
