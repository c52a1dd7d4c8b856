"""Microbatches by a token budget (`training.max_tokens_per_microbatch`) against fixed rows.

The budget regroups a step's rows (sorted by length, each microbatch padded to its own
longest row, so microbatches differ in shape and order); with per-token normalization over
the global batch the step must not change. Each budget run is compared with a fixed-row run
of the same step (SGD at lr=1: the update is the gradient) at TP=2, PP=2 (Megatron's p2p
then exchanges each activation's shape) and DP=2 (ranks with different microbatch counts).
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_opd.algorithms.opd_rl import group_advantages
from megatron_opd.config.job import load_job_config
from megatron_opd.config.schema import ConfigError
from megatron_opd.pipeline.batching import padded_length, plan_microbatches
from megatron_opd.pipeline.packing import pack_rows
from tests.gkd_setup import make_gkd_setup, overrides, write_dataset
from tests.helpers.trainer_runs import PARITY_RTOL, assert_same_update, merged, run
from tests.reward_functions import completion_length, first_id_parity

# Rows of 4 to 31 tokens (data.max_length 32): padded to 8, 16, 24 or 32.
LONG_AND_SHORT = {"data.max_length": 32, "training.micro_batch_size": 2}
BUDGET = 48  # 1 row of 32 or 24, 3 of 16, 6 of 8 per microbatch


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("budget")
    setup = make_gkd_setup(root)
    setup["short"] = setup["train"]  # prompts of 3 to 8 words: OPD-RL's samples differ in reward there
    setup["train"] = str(write_dataset(root / "mixed.jsonl", 64, seed=7, lengths=(2, 28)))
    return setup


def microbatch_shapes(examples: list[dict], budget) -> list[tuple[int, int]]:
    """The `[b, s]` of each microbatch the planner makes of `examples` (an independent check
    that the run below really had microbatches of several shapes)."""
    lengths = [len(example["input_ids"]) for example in examples]
    groups = plan_microbatches(lengths, 8, 2, budget)
    return [(len(group), max(padded_length(lengths[row], 8) for row in group)) for group in groups]


# ------------------------------------------------------------------ the plan


@pytest.mark.parametrize("seed", range(5))
def test_plan_covers_every_row_within_the_budget(seed):
    generator = random.Random(seed)
    lengths = [generator.choice([generator.randint(2, 40), generator.randint(100, 300)]) for _ in range(37)]
    budget = 256
    groups = plan_microbatches(lengths, 8, 4, budget)
    assert sorted(row for group in groups for row in group) == list(range(len(lengths)))
    for group in groups:
        width = max(padded_length(lengths[row], 8) for row in group)
        assert len(group) * width <= budget or len(group) == 1, (group, width)
    # longest first: no microbatch holds a row longer than an earlier microbatch's rows
    order = [lengths[row] for group in groups for row in group]
    assert order == sorted(order, reverse=True)
    # greedy: the next microbatch's first row would not have fit in the previous one
    for previous, following in zip(groups, groups[1:]):
        width = padded_length(lengths[previous[0]], 8)
        assert (len(previous) + 1) * width > budget


def test_fixed_rows_plan_is_consecutive():
    assert plan_microbatches([5, 9, 3, 7, 2], 8, 2, None) == [(0, 1), (2, 3), (4,)]


@pytest.mark.parametrize("fields, message", [
    ({"training.max_tokens_per_microbatch": 4}, "training.max_tokens_per_microbatch"),
    ({"training.max_tokens_per_microbatch": 8, "parallel.tensor_model_parallel_size": 2,
      "parallel.sequence_parallel": True}, "an integer >= 16"),
])
def test_budget_validated_at_load(setup, tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        load_job_config(None, overrides(setup, tmp_path, **fields), world_size=2)


# ------------------------------------------------------------------ the step


@pytest.fixture(scope="module")
def fixed(setup, tmp_path_factory):
    return merged(run(setup, tmp_path_factory.mktemp("fixed"), **LONG_AND_SHORT))


def test_budget_step_equals_fixed_rows_step(setup, fixed, tmp_path):
    """GKD, one process: the same loss, token count and every gradient (fp32, PARITY_RTOL)."""
    examples = fixed["examples"][0]
    shapes = microbatch_shapes(examples, BUDGET)
    assert len(set(shapes)) > 2 and microbatch_shapes(examples, None) != shapes, shapes
    budget = merged(run(setup, tmp_path, **LONG_AND_SHORT, **{"training.max_tokens_per_microbatch": BUDGET}))
    assert budget["steps"][0]["tokens"] == fixed["steps"][0]["tokens"]
    assert budget["steps"][0]["loss"] == pytest.approx(fixed["steps"][0]["loss"], rel=1e-6)
    assert_same_update(budget, fixed, PARITY_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2", "tp2_sp-packed", "pp2-packed", "dp2-packed"])
def test_budget_step_equals_fixed_rows_step_parallel(setup, fixed, tmp_path, layout):
    """GKD at TP=2 (packed: with sequence parallelism, rows padded to a multiple of 2), PP=2
    (activations of several shapes between stages) and DP=2 (the ranks get different
    microbatch counts), by a token budget or packed, against the fixed-row step on one process."""
    fields = {"tp2": {"parallel.tensor_model_parallel_size": 2},
              "tp2_sp": {"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True},
              "pp2": {"parallel.pipeline_model_parallel_size": 2}, "dp2": {}}[layout.split("-")[0]]
    packing = {"training.pack_sequences": True} if layout.endswith("-packed") else {}
    other = merged(run(setup, tmp_path, world=2, **LONG_AND_SHORT, **fields, **packing,
                       **{"training.max_tokens_per_microbatch": BUDGET}))
    if layout == "dp2":  # rank 0's half of the batch: its microbatch count differs from rank 1's
        first = other["examples"][0]
        second = [example for example in fixed["examples"][0] if example not in first]
        assert len(microbatch_shapes(first, BUDGET)) != len(microbatch_shapes(second, BUDGET))
    assert other["steps"][0]["tokens"] == fixed["steps"][0]["tokens"]
    assert other["steps"][0]["loss"] == pytest.approx(fixed["steps"][0]["loss"], rel=1e-5)
    assert_same_update(other, fixed, PARITY_RTOL)


OPD_RL = {"algorithm": "opd_rl", "num_generations": 2, "max_completion_length": 5, "temperature": 1.2,
          "teacher_kl_coef": 0.5, "parallel.seed": 2,
          "reward_funcs": "[tests.reward_functions:completion_length, tests.reward_functions:first_id_parity]"}


BUDGET_RL = 64  # rows of 9 to 17 tokens: 4 of 16 per microbatch, by length (not in order)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["budget", "packed"])
def test_opd_rl_budget_step_equals_fixed_rows_step(setup, tmp_path, packing):
    """OPD-RL: per-sample advantages, teacher log-probs and samples follow the regrouped (or packed) rows."""
    setup = {**setup, "train": setup["short"]}
    reference = merged(run(setup, tmp_path / "fixed", **LONG_AND_SHORT, **OPD_RL))
    examples = reference["examples"][0]
    # the regrouping must move samples of different advantage, or misaligned advantages go unseen
    completions = [example["input_ids"][example["prompt_length"]:] for example in examples]
    rewards = [a + b for a, b in zip(completion_length(None, None, completions), first_id_parity(None, None, completions))]
    advantages = group_advantages(torch.tensor(rewards), OPD_RL["num_generations"]).tolist()
    groups = plan_microbatches([len(example["input_ids"]) for example in examples], 8, 2, BUDGET_RL)
    assert any(list(group) != sorted(group) and len({advantages[row] for row in group}) > 1 for group in groups), \
        (groups, advantages)
    if packing:  # packed rows reorder the samples too: several advantages share a row
        packed = pack_rows([len(example["input_ids"]) for example in examples], BUDGET_RL + 1)
        assert any(len({advantages[row] for row in group}) > 1 for group in packed), (packed, advantages)
    budget = merged(run(setup, tmp_path / "budget", **LONG_AND_SHORT, **OPD_RL,
                        **{"training.max_tokens_per_microbatch": BUDGET_RL, "training.pack_sequences": packing}))
    assert budget["examples"] == reference["examples"]
    assert budget["steps"][0]["tokens"] == reference["steps"][0]["tokens"]
    assert budget["steps"][0]["loss"] == pytest.approx(reference["steps"][0]["loss"], rel=1e-5, abs=1e-7)
    assert_same_update(budget, reference, PARITY_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["budget", "packed"])
def test_opsd_budget_step_equals_fixed_rows_step(setup, tmp_path, packing):
    """OPSD (teacher: self, on-policy): the teacher's view has other prompt lengths; it is grouped
    as the student's microbatches (the same rows), each padded to its own longest row."""
    from tests.test_opd_rl_trainer import write_opsd_dataset

    data = write_opsd_dataset(tmp_path / "opsd.jsonl", 32, seed=5)
    fields = {"teacher": "self", "teacher_model": "null", "training.micro_batch_size": 2, "lmbda": 1.0,
              "max_completion_length": 4, "temperature": 1.0, "data.dataset": f"[{data}]", "data.val_dataset": "[]"}
    reference = merged(run(setup, tmp_path / "fixed", **fields))
    examples = reference["examples"][0]
    groups = plan_microbatches([len(example["input_ids"]) for example in examples], 8, 2, 24)
    # the teacher's own lengths would group the rows otherwise: its view must follow the student's
    teacher_lengths = [len(example["teacher_prompt_ids"]) + len(example["input_ids"]) - example["prompt_length"]
                       for example in examples]
    assert plan_microbatches(teacher_lengths, 8, 2, 24) != groups != plan_microbatches([0] * 8, 8, 2, None), groups
    budget = merged(run(setup, tmp_path / "budget", **fields, **{"training.max_tokens_per_microbatch": 24,
                                                                 "training.pack_sequences": packing}))
    assert budget["examples"] == reference["examples"]
    assert budget["steps"][0]["tokens"] == reference["steps"][0]["tokens"]
    assert budget["steps"][0]["loss"] == pytest.approx(reference["steps"][0]["loss"], rel=1e-5)
    assert_same_update(budget, reference, PARITY_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["budget", "packed"])
def test_teacher_cache_with_a_budget(setup, fixed, tmp_path, packing):
    """The cache written with a token budget (rows regrouped, or packed) equals the fixed-row
    cache, and a step read from it with a budget equals the fixed-row step read from it."""
    budget_fields = {"training.max_tokens_per_microbatch": BUDGET, "training.pack_sequences": packing}
    from megatron_opd.testing import run_distributed
    from tests.helpers.teacher_runs import K, assert_same_cache, cache_argv, cache_on_rank

    caches = {}
    for name, fields in (("fixed", LONG_AND_SHORT), ("budget", {**LONG_AND_SHORT, **budget_fields})):
        caches[name] = tmp_path / f"{name}_cache"
        assert run_distributed(cache_on_rank, 1, cache_argv(setup, caches[name], tmp_path, **fields),
                               timeout=300) == [0]
    assert_same_cache(caches["budget"], caches["fixed"], atol=1e-5)
    cached = {"teacher_model": "null", "teacher_cache": str(caches["fixed"]), "gkd_logits_topk": K}
    reference = merged(run(setup, tmp_path / "fixed", **LONG_AND_SHORT, **cached))
    budget = merged(run(setup, tmp_path / "budget", **LONG_AND_SHORT, **cached, **budget_fields))
    assert budget["steps"][0]["loss"] == pytest.approx(reference["steps"][0]["loss"], rel=1e-6)
    assert_same_update(budget, reference, PARITY_RTOL)


# ------------------------------------------------------------------ packed rows

PACKED = {"training.max_tokens_per_microbatch": BUDGET, "training.pack_sequences": True}


def test_pack_sequences_needs_a_budget(setup, tmp_path):
    with pytest.raises(ConfigError, match="training.pack_sequences"):
        load_job_config(None, overrides(setup, tmp_path, **{"training.pack_sequences": True}), world_size=1)


@pytest.mark.parametrize("seed", range(3))
def test_packed_microbatches_hold_every_example_at_its_span(seed):
    """Each example once, in one row of <= budget input positions; its ids at its span, its
    shifted loss mask there, nothing counted across its boundary (checked against the examples)."""
    from megatron_opd.pipeline.batching import make_microbatches

    generator = random.Random(seed)
    examples = []
    for _ in range(23):
        length = generator.randint(2, 40)
        prompt = generator.randint(1, length - 1)
        examples.append({"input_ids": [generator.randint(1, 99) for _ in range(length)],
                         "loss_mask": [0] * prompt + [1] * (length - prompt)})
    config = load_job_config(None, ["algorithm=sft", "model=m", "data.dataset=[d]", "training.global_batch_size=23",
                                    "training.max_tokens_per_microbatch=64", "training.pack_sequences=true"],
                             world_size=1)
    microbatches = make_microbatches(examples, 0, config, "cpu")
    assert sorted(row for batch in microbatches for row in batch.rows) == list(range(len(examples)))
    assert len(microbatches) < len(examples)  # several examples share rows
    for batch in microbatches:
        assert batch.tokens.shape[0] == 1 and batch.tokens.shape[1] - 1 <= 64 or len(batch.rows) == 1
        counted = []
        for row, (ids, mask) in zip(batch.rows, batch.example_sequences()):
            assert ids == examples[row]["input_ids"]
            assert mask == [bool(value) for value in examples[row]["loss_mask"][1:]]
            counted.append(sum(examples[row]["loss_mask"][1:]))
        assert batch.example_token_counts() == counted and batch.num_tokens == sum(counted)


def test_packed_step_equals_fixed_rows_step(setup, fixed, tmp_path):
    """GKD, one process: packed rows (block-diagonal masks, restarted positions) give the fixed-row step."""
    packed = merged(run(setup, tmp_path, **LONG_AND_SHORT, **PACKED))
    assert packed["steps"][0]["tokens"] == fixed["steps"][0]["tokens"]
    assert packed["steps"][0]["loss"] == pytest.approx(fixed["steps"][0]["loss"], rel=1e-6)
    assert_same_update(packed, fixed, PARITY_RTOL)
