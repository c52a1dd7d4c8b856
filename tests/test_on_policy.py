"""On-policy GKD through the real trainer: student samples (lmbda), teacher samples (seq_kd).

Samples are seeded per example of the global batch, so one on-policy step must give the
same samples, loss and update at TP=1, DP=2, TP=2 and PP=2 (SGD at lr=1: the update is
the gradient); at TP=1 they are HF transformers' float64 ones on the same samples. The
sampler itself is checked against HF `generate` in test_sampler.py.
"""

from __future__ import annotations

import pytest

from megatron_opd.algorithms.gkd import response_source
from tests.gkd_setup import make_gkd_setup
from tests.helpers.trainer_runs import PARITY_RTOL, assert_same_update, merged, run
from tests.hf_models import VOCAB
from tests.kd_hf_reference import megatron_to_hf_names, step_reference
from tests.tiny_models import relative_error

EOS = 0  # the test tokenizer's eos_token "w0"

ON_POLICY = {"lmbda": 1.0, "max_completion_length": 6, "temperature": 1.5, "sft_alpha": 0.5,
             "training.micro_batch_size": 2}
LAYOUTS = {"dp2": (2, {}), "tp2": (2, {"parallel.tensor_model_parallel_size": 2}),
           "pp2": (2, {"parallel.pipeline_model_parallel_size": 2}),
           "tp2_sp": (2, {"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True})}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return make_gkd_setup(tmp_path_factory.mktemp("on_policy"))


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    return merged(run(setup, tmp_path_factory.mktemp("tp1"), **ON_POLICY))


def test_on_policy_step_matches_hf_reference(setup, single):
    """The step trained on the student's samples: every sampled token counted (EOS included),
    and its divergence, loss and gradient are the float64 ones of HF transformers' student
    and teacher (same weights) on exactly those samples (`tests.kd_hf_reference`)."""
    step, examples = single["steps"][0], single["examples"][0]
    assert step["on_policy"] == 1.0 and step["teacher_sampled"] == 0.0
    assert "sft_loss" not in step, "the CE must not be applied to the student's own samples"
    assert len(examples) == 8 and step["sampling_s"] > 0
    lengths = []
    for example in examples:
        completion = example["input_ids"][example["prompt_length"]:]
        assert example["loss_mask"] == [0] * example["prompt_length"] + [1] * len(completion)
        # the sampler stops at EOS (kept) or after max_completion_length tokens
        assert 1 <= len(completion) <= ON_POLICY["max_completion_length"]
        assert EOS not in completion[:-1]
        assert completion[-1] == EOS or len(completion) == ON_POLICY["max_completion_length"]
        lengths.append(len(completion))
    assert step["tokens"] == sum(lengths) and step["sample_length"] == pytest.approx(sum(lengths) / 8, rel=1e-12)

    reference = step_reference(setup["student"], setup["teacher"], examples, beta=0.5,
                               temperature=ON_POLICY["temperature"], sft_alpha=0.0)
    assert reference.tokens == step["tokens"]
    assert step["divergence"] == pytest.approx(reference.divergence, rel=1e-5)
    assert step["loss"] == pytest.approx(reference.loss, rel=1e-5)
    # SGD at lr=1: the update is minus this gradient (weights that are HF weights one to one)
    for megatron, hf in megatron_to_hf_names().items():
        grad = single["grads"][megatron]
        assert relative_error(grad[:VOCAB] if megatron.startswith("embedding") else grad,
                              reference.grads[hf]) < 5e-5, megatron


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_on_policy_step_same_at_every_layout(setup, tmp_path, single, layout):
    world, fields = LAYOUTS[layout]
    other = merged(run(setup, tmp_path, world=world, **ON_POLICY, **fields))
    expected, actual = single["steps"][0], other["steps"][0]
    assert actual["sample_length"] == expected["sample_length"] and actual["tokens"] == expected["tokens"]
    assert actual["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert_same_update(other, single, PARITY_RTOL)


def test_mixed_steps_agree_across_ranks(setup, tmp_path):
    """lmbda=0.5 with seq_kd over 6 steps at DP=2: every rank takes the same decision each
    step; student-sampled steps carry no CE, teacher-sampled ones do."""
    results = run(setup, tmp_path, world=2, steps=6, lmbda=0.5, seq_kd=True, sft_alpha=0.5,
                  max_completion_length=4)
    flags = [[(step["on_policy"], step["teacher_sampled"]) for step in result["steps"]] for result in results]
    assert flags[0] == flags[1]
    assert {on + teacher for on, teacher in flags[0]} == {1.0}
    assert {on for on, _ in flags[0]} == {0.0, 1.0}, "6 steps at lmbda=0.5 should mix both sources for this seed"
    for step in results[0]["steps"]:
        assert ("sft_loss" in step) == (step["teacher_sampled"] == 1.0)


def test_response_source_draws():
    draws = [response_source(0.3, False, seed=7, iteration=i) for i in range(4000)]
    assert set(draws) == {"student", "dataset"}
    assert abs(draws.count("student") / len(draws) - 0.3) < 0.03
    assert draws == [response_source(0.3, False, seed=7, iteration=i) for i in range(4000)]
    assert draws != [response_source(0.3, False, seed=8, iteration=i) for i in range(4000)]
    assert {response_source(0.0, True, 7, i) for i in range(100)} == {"teacher"}
    assert {response_source(1.0, True, 7, i) for i in range(100)} == {"student"}
