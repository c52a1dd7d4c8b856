"""Expert parallelism checked against the run's models at start (`resolve_models`), before any
process group exists: EP > 1 needs a mixture-of-experts model, and a MoE model that the Megatron
sampler decodes must keep its experts within TP."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_opd.checkpoint.run_models import resolve_models
from megatron_opd.config.job import load_job_config
from megatron_opd.config.schema import ConfigError
from tests.hf_models import make_hf_model, make_tokenizer
from tests.moe_models import make_moe_hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_layout")
    dense = make_hf_model("qwen2", root / "dense")
    moe = make_moe_hf_model("qwen3_moe", root / "moe")
    make_tokenizer(moe)
    return {"dense": str(dense), "moe": str(moe)}


def config(student: str, teacher: str, **overrides):
    """The run's config; every model reads the MoE directory's tokenizer (the dense one ships none)."""
    tokenizer = str(Path(student).parent / "moe")
    argv = [f"model={student}", f"teacher_model={teacher}", "data.dataset=[unused.jsonl]", f"data.tokenizer={tokenizer}"]
    return load_job_config(None, argv + [f"{key}={value}" for key, value in overrides.items()])


def test_expert_parallelism_without_a_moe_model_is_refused(models):
    with pytest.raises(ConfigError, match=r"parallel.expert_model_parallel_size=2 is invalid: no model of this run "
                                          r"is a mixture of experts \(model, teacher_model\)"):
        resolve_models(config(models["dense"], models["dense"], **{"parallel.expert_model_parallel_size": 2}))


@pytest.mark.parametrize("overrides, sampled", [
    ({"lmbda": 0.5}, "model (on-policy samples)"),
    ({"lmbda": 0.0, "seq_kd": True}, "teacher_model (seq_kd samples)"),
])
def test_sampling_a_moe_model_with_experts_beyond_tp_is_refused(models, overrides, sampled):
    student, teacher = (models["moe"], models["dense"]) if "seq_kd" not in overrides else (models["dense"],
                                                                                           models["moe"])
    layout = {"parallel.expert_model_parallel_size": 2, "parallel.tensor_model_parallel_size": 1}
    with pytest.raises(ConfigError, match=re.escape("= 2 ranks is invalid with tensor_model_parallel_size=1 when the "
                                                    f"Megatron sampler decodes a mixture-of-experts model ({sampled})")):
        resolve_models(config(student, teacher, **layout, **overrides))


@pytest.mark.parametrize("overrides", [
    {"lmbda": 0.0},  # off-policy: nothing is sampled
    {"lmbda": 0.5, "parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True,
     "parallel.expert_tensor_parallel_size": 1},  # the 2 expert ranks are the TP group
    {"lmbda": 0.5, "rollout.engine": "vllm"},  # vLLM samples, not the Megatron sampler
])
def test_expert_layouts_that_work_are_accepted(models, overrides):
    run = resolve_models(config(models["moe"], models["dense"], **{"parallel.expert_model_parallel_size": 2},
                                **overrides))
    assert run.student.model.is_moe


def count_on_rank(directory: str, ep: int) -> int:
    from megatron_opd.checkpoint import load_pretrained
    from megatron_opd.config import ParallelConfig
    from megatron_opd.runtime import initialize_runtime
    from megatron_opd.trainer.summary import count_parameters

    runtime = initialize_runtime(ParallelConfig(expert_model_parallel_size=ep))
    return count_parameters(load_pretrained(directory, runtime, role="teacher"))


def test_parameter_count_is_the_whole_model_at_any_expert_layout(models):
    """The start line's count: HF's parameters plus the vocab padding rows, at EP=1 and EP=2
    (where each rank holds half the experts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_opd.models.hf_config import model_config_from_hf
    from megatron_opd.testing import run_distributed

    hf = AutoModelForCausalLM.from_pretrained(models["moe"])
    config = AutoConfig.from_pretrained(models["moe"])
    heads = 1 if config.tie_word_embeddings else 2
    padding = model_config_from_hf(config.to_dict()).padded_vocab_size(1) - config.vocab_size
    expected = sum(param.numel() for param in hf.parameters()) + heads * padding * config.hidden_size
    assert run_distributed(count_on_rank, 1, models["moe"], 1) == [expected]
    assert run_distributed(count_on_rank, 2, models["moe"], 2) == [expected, expected]


def test_token_budget_with_experts_across_data_parallel_ranks_is_refused_at_load():
    argv = ["model=/m", "teacher_model=/t", "data.dataset=[unused.jsonl]", "training.max_tokens_per_microbatch=64"]
    with pytest.raises(ConfigError, match=r"training.max_tokens_per_microbatch=64 is invalid: null when the experts "
                                          r"span data-parallel ranks .* = 2 > tensor_model_parallel_size 1"):
        load_job_config(None, argv + ["parallel.expert_model_parallel_size=2"])
    within_tp = ["parallel.expert_model_parallel_size=2", "parallel.tensor_model_parallel_size=2",
                 "parallel.sequence_parallel=true", "parallel.expert_tensor_parallel_size=1"]
    assert load_job_config(None, argv + within_tp).training.max_tokens_per_microbatch == 64
