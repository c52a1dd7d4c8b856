"""build_gpt_model: roles, layer-spec choice, vocab padding, refusals."""

import pytest

from megatron_opd.config import ModelConfig, ParallelConfig
from megatron_opd.models.layer_specs import resolve_transformer_impl
from megatron_opd.testing import DistributedTestError, run_distributed
from tests.tiny_models import GQA_QKNORM


def build_and_describe(config: ModelConfig, parallel: ParallelConfig, role: str = "student") -> dict:
    from megatron_opd.models import build_gpt_model
    from megatron_opd.models.norms import RMSNorm
    from megatron_opd.runtime import initialize_runtime

    model = build_gpt_model(config, initialize_runtime(parallel), role=role)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    return {
        "training": model.training,
        "trainable": sum(p.requires_grad for p in model.parameters()),
        "embedding_rows": model.embedding.word_embeddings.weight.shape[0],
        "norms": len(norms),
        "norms_marked_sp": all(getattr(n.weight, "sequence_parallel", False) for n in norms),
    }


def test_teacher_is_frozen_and_in_eval_mode():
    (student,) = run_distributed(build_and_describe, 1, GQA_QKNORM, ParallelConfig())
    (teacher,) = run_distributed(build_and_describe, 1, GQA_QKNORM, ParallelConfig(), "teacher")
    assert student["training"] and student["trainable"] > 0
    assert not teacher["training"] and teacher["trainable"] == 0


def test_local_spec_uses_sp_capable_norm_everywhere_and_shards_the_padded_vocab():
    parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    ranks = run_distributed(build_and_describe, 2, GQA_QKNORM, parallel)
    layers = GQA_QKNORM.num_layers
    for info in ranks:
        assert info["norms"] == 4 * layers + 1  # input, pre-MLP, Q, K per layer + final
        assert info["norms_marked_sp"]
        assert info["embedding_rows"] == GQA_QKNORM.padded_vocab_size(2) // 2


def test_unsplittable_model_is_refused_before_building():
    bad = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=1,
                      ffn_hidden_size=128, vocab_size=256)
    with pytest.raises(DistributedTestError, match="model.num_query_groups=1 .*tensor_model_parallel_size=2"):
        run_distributed(build_and_describe, 2, bad, ParallelConfig(tensor_model_parallel_size=2))
    with pytest.raises(DistributedTestError, match="role='critic' is invalid"):
        run_distributed(build_and_describe, 1, GQA_QKNORM, ParallelConfig(), "critic")


@pytest.mark.parametrize("te_installed", [False, True], ids=["without_te", "with_te"])
def test_transformer_impl_resolution(monkeypatch, te_installed):
    """Both stacks on any machine (whether Transformer Engine imports is set each way): CPU is
    always the local spec; on CUDA, auto is Transformer Engine, which without TE is an error
    that says how to install it, never a silent fallback to the local spec."""
    from megatron_opd.models import layer_specs

    monkeypatch.setattr(layer_specs, "has_transformer_engine", lambda: te_installed)
    assert resolve_transformer_impl("auto", "cpu") == "local"
    assert resolve_transformer_impl("local", "cuda") == "local"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_transformer_impl("transformer_engine", "cpu")
    with pytest.raises(ValueError, match="one of auto, transformer_engine, local"):
        resolve_transformer_impl("apex", "cpu")
    if te_installed:
        assert resolve_transformer_impl("auto", "cuda") == "transformer_engine"
        assert resolve_transformer_impl("transformer_engine", "cuda") == "transformer_engine"
    else:
        for requested in ("auto", "transformer_engine"):
            with pytest.raises(ImportError, match=r"pip install -e \.\[gpu\]"):
                resolve_transformer_impl(requested, "cuda")


def test_transformer_engine_detection_follows_this_machine():
    """The real check, unpatched, on this machine: TE importable here or not."""
    from megatron_opd.models.layer_specs import has_transformer_engine

    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        assert has_transformer_engine() is False
        with pytest.raises(ImportError, match=r"pip install -e \.\[gpu\]"):
            resolve_transformer_impl("auto", "cuda")
    else:
        assert has_transformer_engine() is True
        assert resolve_transformer_impl("auto", "cuda") == "transformer_engine"
