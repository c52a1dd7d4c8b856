"""GKD with mixture-of-experts models through the real trainer on gloo ranks.

A Qwen3-MoE student (8 experts, top-2, a dense layer, load-balancing coefficient 0.01)
distilled from a dense teacher, and a dense student from a Qwen2-MoE teacher (shared
expert). One SGD step at lr=1 (update = minus gradient) at EP=2 (2 ranks: experts split,
the rest data-parallel) must equal EP=1 (1 rank): loss, the aux loss term and every
gradient, relative to each tensor's largest gradient (`PARITY_RTOL`, 5e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gkd_setup import write_dataset
from tests.helpers.trainer_runs import PARITY_RTOL, assert_same_update, merged, run
from tests.hf_models import make_hf_model, make_tokenizer
from tests.moe_models import make_moe_hf_model


def moe_setup(root: Path, student: str, teacher: str) -> dict:
    root.mkdir(parents=True, exist_ok=True)

    def make(family: str, directory: Path, seed: int) -> Path:
        if family in ("qwen3_moe", "qwen2_moe", "mixtral"):
            return make_moe_hf_model(family, directory, seed=seed)
        return make_hf_model(family, directory, seed=seed)

    make_tokenizer(root / "tokenizer")
    return {"student": str(make(student, root / "student", 1)), "teacher": str(make(teacher, root / "teacher", 2)),
            "tokenizer": str(root / "tokenizer"), "train": str(write_dataset(root / "train.jsonl", 64, seed=3)),
            "val": str(write_dataset(root / "val.jsonl", 16, seed=4))}


@pytest.fixture(scope="module")
def moe_student(tmp_path_factory) -> dict:
    return moe_setup(tmp_path_factory.mktemp("moe_student"), "qwen3_moe", "llama2")


@pytest.fixture(scope="module")
def moe_teacher(tmp_path_factory) -> dict:
    return moe_setup(tmp_path_factory.mktemp("moe_teacher"), "qwen3", "qwen2_moe")


def test_moe_student_ep2_equals_ep1(moe_student, tmp_path):
    fields = {"training.micro_batch_size": 2}
    reference = merged(run(moe_student, tmp_path / "ep1", **fields))
    other = merged(run(moe_student, tmp_path / "ep2", world=2, **fields,
                       **{"parallel.expert_model_parallel_size": 2}))
    step, expected = other["steps"][0], reference["steps"][0]
    assert expected["moe_aux_loss"] > 0 and expected["moe_expert_load_max"] >= 1.0
    assert abs(step["loss"] - expected["loss"]) < 1e-5
    assert abs(step["moe_aux_loss"] - expected["moe_aux_loss"]) < 1e-6 * max(1.0, expected["moe_aux_loss"])
    assert step["moe_expert_tokens_max"] == expected["moe_expert_tokens_max"]
    assert_same_update(other, reference, PARITY_RTOL)


def _megatron_core_version() -> tuple[int, int]:
    import megatron.core

    return tuple(int(part) for part in megatron.core.__version__.split(".")[:2])


@pytest.mark.parametrize("layout", [
    {"parallel.pipeline_model_parallel_size": 2},  # the dense layer and one MoE layer per stage
    pytest.param({"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True},
                 marks=pytest.mark.xfail(_megatron_core_version() >= (0, 19), strict=True,
                                         reason="known bug: with Megatron-Core 0.19 the router's gradient at "
                                                "TP=2+SP differs from one rank's (1.28 relative; 0.16 equal)")),
])
def test_moe_student_across_pipeline_and_tensor_layouts_equals_one_rank(moe_student, tmp_path, layout):
    """The routers' padding mask and aux loss on every stage and TP rank: the step equals one rank's."""
    fields = {"training.micro_batch_size": 2}
    reference = merged(run(moe_student, tmp_path / "one", **fields))
    other = merged(run(moe_student, tmp_path / "split", world=2, **fields, **layout))
    step, expected = other["steps"][0], reference["steps"][0]
    assert abs(step["loss"] - expected["loss"]) < 1e-5
    assert abs(step["moe_aux_loss"] - expected["moe_aux_loss"]) < 1e-5 * max(1.0, expected["moe_aux_loss"])
    assert_same_update(other, reference, PARITY_RTOL)


def test_dense_student_of_moe_teacher_ep2_equals_ep1(moe_teacher, tmp_path):
    fields = {"training.micro_batch_size": 2}
    reference = merged(run(moe_teacher, tmp_path / "ep1", **fields))
    other = merged(run(moe_teacher, tmp_path / "ep2", world=2, **fields,
                       **{"parallel.expert_model_parallel_size": 2}))
    assert abs(other["steps"][0]["loss"] - reference["steps"][0]["loss"]) < 1e-5
    assert_same_update(other, reference, PARITY_RTOL)


def reference_aux_loss(hf_dir: str, microbatches: list[list[dict]], coeff: float, z_coeff: float):
    """The router terms of the objective from HF transformers' float64 router logits: per MoE
    layer and microbatch the Switch loss over its counted tokens (Fedus et al., E * sum_e f_e
    P_e, f_e the share of the k*T top-k picks going to expert e, P_e its mean router
    probability) and the z-loss (ST-MoE: mean of logsumexp(logits)^2), each weighted by the
    microbatch's T, summed, divided by all counted tokens N. Returns (aux value, z value,
    {HF parameter name: gradient of both})."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, attn_implementation="eager",
                                                 experts_implementation="eager")
    experts, topk = model.config.num_experts, model.config.num_experts_per_tok
    total, z_total, tokens = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64), 0
    for examples in microbatches:
        per_layer = None
        for example in examples:
            ids = torch.tensor(example["input_ids"][:-1])[None]
            counted = torch.tensor(example["loss_mask"][1:], dtype=torch.bool)
            logits = model(ids, output_router_logits=True).router_logits  # per MoE layer [s, E]
            rows = [layer_logits[counted] for layer_logits in logits]
            per_layer = rows if per_layer is None else [torch.cat(pair) for pair in zip(per_layer, rows)]
        count = per_layer[0].shape[0]
        tokens += count
        for layer_logits in per_layer:
            probs = torch.softmax(layer_logits, dim=-1)
            picks = torch.zeros_like(probs).scatter(1, probs.topk(topk, dim=-1).indices, 1.0)
            switch = experts * (picks.sum(0) / (topk * count) * probs.mean(0)).sum()
            total = total + count * switch
            z_total = z_total + count * torch.logsumexp(layer_logits, dim=-1).square().mean()
    value, z_value = coeff * total / tokens, z_coeff * z_total / tokens
    (value + z_value).backward()
    grads = {name: param.grad.float() for name, param in model.named_parameters() if param.grad is not None}
    return value.item(), z_value.item(), grads


def test_aux_loss_gradient_matches_reference(tmp_path):
    """Student with router_aux_loss_coef 1 and router_z_loss_coef 0.1 minus the same student
    with neither: the gradient difference is the router terms' gradient, which must equal HF
    float64 autograd of the reference terms (normalised per counted token like the
    divergence); the logged `moe_aux_loss` and `moe_z_loss` their values."""
    coeff, z_coeff = 1.0, 0.1
    setup = moe_setup(tmp_path / "with", "qwen3_moe", "llama2")
    make_moe_hf_model("qwen3_moe", tmp_path / "without", seed=1, router_aux_loss_coef=0.0)
    fields = {"training.micro_batch_size": 2}
    with_aux = merged(run({**setup, "student": str(make_moe_hf_model(
        "qwen3_moe", tmp_path / "with" / "student1", seed=1, router_aux_loss_coef=coeff,
        router_z_loss_coef=z_coeff))}, tmp_path / "a", **fields))
    without = merged(run({**setup, "student": str(tmp_path / "without")}, tmp_path / "b", **fields))
    assert "moe_aux_loss" not in without["steps"][0] and "moe_z_loss" not in without["steps"][0]
    examples = with_aux["examples"][0]
    microbatches = [examples[i:i + 2] for i in range(0, len(examples), 2)]
    value, z_value, grads = reference_aux_loss(str(tmp_path / "without"), microbatches, coeff, z_coeff)
    assert abs(with_aux["steps"][0]["moe_aux_loss"] - value) < 1e-5 * value, (with_aux["steps"][0], value)
    assert abs(with_aux["steps"][0]["moe_z_loss"] - z_value) < 1e-5 * z_value, (with_aux["steps"][0], z_value)
    from tests.tiny_models import relative_error

    compared = 0
    for layer in range(4):
        megatron = f"decoder.layers.{layer}.mlp.router.weight"
        if megatron not in with_aux["grads"]:
            continue  # the dense layer
        difference = with_aux["grads"][megatron] - without["grads"][megatron]
        error = relative_error(difference, grads[f"model.layers.{layer}.mlp.gate.weight"])
        assert error < 1e-4, f"{megatron}: aux gradient differs by {error:.2e} (relative)"
        norm = f"decoder.layers.{layer}.input_layernorm.weight"
        difference = with_aux["grads"][norm] - without["grads"][norm]
        error = relative_error(difference, grads[f"model.layers.{layer}.input_layernorm.weight"])
        assert error < 1e-3, f"{norm}: aux gradient differs by {error:.2e} (relative)"
        compared += 1
    assert compared == 3


def test_moe_teacher_cache_same_at_ep2(moe_teacher, tmp_path):
    """`megatron-opd cache-teacher` with the Qwen2-MoE teacher (forward only): TP=2 with its
    experts split EP=2 x ETP=1 over the same 2 ranks (cache-teacher runs no data parallelism)
    gives the 1-rank cache: top-K ids equal, log-probs within 5e-5 (TP=2's split matmuls round
    otherwise: measured 1.7e-5 on log-probs near -8, 3.5e-6 relative)."""
    from megatron_opd.testing import run_distributed
    from tests.helpers.teacher_runs import assert_same_cache, cache_argv, cache_on_rank

    single, split = tmp_path / "ep1", tmp_path / "ep2"
    assert run_distributed(cache_on_rank, 1, cache_argv(moe_teacher, single, tmp_path), timeout=300) == [0]
    argv = cache_argv(moe_teacher, split, tmp_path, **{"parallel.tensor_model_parallel_size": 2,
                                                        "parallel.expert_model_parallel_size": 2,
                                                        "parallel.expert_tensor_parallel_size": 1})
    assert run_distributed(cache_on_rank, 2, argv, timeout=300) == [0, 0]
    assert_same_cache(split, single, atol=5e-5)


ON_POLICY = {"training.micro_batch_size": 2, "lmbda": 1.0, "max_completion_length": 5, "temperature": 1.0}


def test_on_policy_moe_student_with_experts_inside_tp(moe_student, tmp_path):
    """Sampling + GKD at TP=2 (+SP, which Megatron's MoE training needs with TP) with the
    experts split EP=2 x ETP=1 over the same ranks equals 1 rank: same samples, same loss."""
    from megatron_opd.testing.multiprocess import DistributedTestError

    reference = merged(run(moe_student, tmp_path / "ep1", **ON_POLICY))
    layout = {"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True,
              "parallel.expert_model_parallel_size": 2, "parallel.expert_tensor_parallel_size": 1}
    other = merged(run(moe_student, tmp_path / "tp2ep2", world=2, **ON_POLICY, **layout))
    assert reference["examples"][0] == other["examples"][0]  # the sampled responses
    assert abs(other["steps"][0]["loss"] - reference["steps"][0]["loss"]) < 1e-5
    # Experts spread over data-parallel ranks: refused at start, naming the fields.
    with pytest.raises(DistributedTestError, match=r"expert_model_parallel_size=2 x expert_tensor_parallel_size=1 = "
                                                   r"2 ranks is invalid with tensor_model_parallel_size=1"):
        run(moe_student, tmp_path / "dp_ep2", world=2, **ON_POLICY, **{"parallel.expert_model_parallel_size": 2})
    # Training with TP but without sequence parallelism: refused by name.
    with pytest.raises(DistributedTestError, match="parallel.sequence_parallel=False is invalid"):
        run(moe_student, tmp_path / "tp2", world=2, **{"training.micro_batch_size": 2,
                                                        "parallel.tensor_model_parallel_size": 2})


def test_gkd_with_a_served_moe_teacher_equals_in_process(moe_teacher, tmp_path):
    """The Qwen2-MoE teacher behind `megatron-opd serve-teacher` (top-K over HTTP) gives the
    in-process teacher's top-K step: same loss (1e-5 relative) and gradients (1e-5)."""
    import os
    import shutil

    from megatron_opd.serve.launch import start_server
    from tests.helpers.teacher_runs import SERVER_ENV, K, served

    served_dir = tmp_path / "teacher_with_tokenizer"
    shutil.copytree(moe_teacher["teacher"], served_dir)
    for name in os.listdir(moe_teacher["tokenizer"]):
        shutil.copy(Path(moe_teacher["tokenizer"]) / name, served_dir / name)
    local = merged(run(moe_teacher, tmp_path / "local", gkd_logits_topk=K))
    with start_server(str(served_dir), max_logprobs=8, env=SERVER_ENV,
                      args=["--tokenizer", moe_teacher["tokenizer"]]) as server:
        remote = merged(run(moe_teacher, tmp_path / "remote", **served(server.url)))
    assert remote["steps"][0]["tokens"] == local["steps"][0]["tokens"]
    assert remote["steps"][0]["loss"] == pytest.approx(local["steps"][0]["loss"], rel=1e-5)
    assert local["steps"][0]["loss"] > 0.05
    assert_same_update(remote, local, 1e-5)
