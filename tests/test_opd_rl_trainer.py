"""OPD-RL and OPSD through the real trainer on gloo ranks.

Samples are seeded per sequence of the global batch, so one step must give the same
samples, rewards, loss and update at TP=1, DP=2, TP=2 and PP=2 (SGD at lr=1: the
update is the gradient). OPSD's teacher is checked against HF transformers run on
exported weights and on the rows' own teacher prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_opd.testing import DistributedTestError, run_distributed
from tests.gkd_setup import completion_for, make_gkd_setup, overrides
from tests.helpers.opd_rl_reference import rollout_reference, second_update_reference
from tests.helpers.trainer_runs import PARITY_RTOL, SGD, assert_same_update, merged, run
from tests.hf_models import VOCAB, hf_logits
from tests.kd_hf_reference import megatron_to_hf_names
from tests.tiny_models import relative_error

OPD_RL = {"algorithm": "opd_rl", "num_generations": 2, "max_completion_length": 5, "temperature": 1.2,
          "teacher_kl_coef": 0.5, "reward_funcs": "[tests.reward_functions:completion_length, tests.reward_functions:first_id_parity]",
          "training.micro_batch_size": 2,
          # a seed whose samples differ in reward within 3 of the 4 groups: with equal rewards
          # in every group (the default seed's draw) A_base is 0 and GRPO's part goes unchecked
          "parallel.seed": 2}
LAYOUTS = {"dp2": {"world": 2}, "tp2": {"world": 2, "parallel.tensor_model_parallel_size": 2},
           "pp2": {"world": 2, "parallel.pipeline_model_parallel_size": 2}}


def write_opsd_dataset(path: Path, rows: int, seed: int) -> Path:
    """Prompt/completion rows whose teacher_prompt holds the answer before the prompt
    (privileged, and of another length than the student's prompt)."""
    generator = torch.Generator().manual_seed(seed)
    with open(path, "w") as handle:
        for _ in range(rows):
            length = int(torch.randint(3, 7, (1,), generator=generator))
            prompt = torch.randint(1, 290, (length,), generator=generator).tolist()
            answer = completion_for(prompt)[:2]
            words = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
            handle.write(json.dumps({"prompt": words(prompt), "completion": words(answer),
                                     "teacher_prompt": words(answer + [299] + prompt)}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("opd_rl")
    setup = make_gkd_setup(root)
    setup["opsd_train"] = str(write_opsd_dataset(root / "opsd.jsonl", 32, seed=5))
    return setup


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    return merged(run(setup, tmp_path_factory.mktemp("tp1"), **OPD_RL))


def reference_of(setup: dict, examples: list[dict]):
    return rollout_reference(setup["student"], setup["teacher"], examples, group=OPD_RL["num_generations"],
                             temperature=OPD_RL["temperature"], teacher_kl_coef=OPD_RL["teacher_kl_coef"])


def test_opd_rl_step_metrics(setup, single):
    """4 prompts x 2 samples; rewards: the sampled length (1..5 tokens) + the first id's parity.
    Every number of the step against the float64 reference of HF transformers' student and
    teacher on the samples the step drew (`tests.helpers.opd_rl_reference`)."""
    step, examples = single["steps"][0], single["examples"][0]
    assert sorted(example["_position"] for example in examples) == list(range(8))
    reference = reference_of(setup, examples)
    assert sum(value != 0 for value in reference.base_advantages) >= 4, "A_base is 0: GRPO's part goes unchecked"
    completions = [example["input_ids"][example["prompt_length"]:] for example in examples]
    assert step["tokens"] == reference.tokens == sum(map(len, completions))
    assert step["sample_length"] == pytest.approx(reference.tokens / 8, rel=1e-12)
    rewards = torch.tensor(reference.rewards, dtype=torch.float64)
    assert step["reward_mean"] == pytest.approx(rewards.mean().item(), rel=1e-9)
    assert step["reward_std"] == pytest.approx(rewards.std().item(), rel=1e-9) and step["reward_std"] > 0
    assert step["reward/tests.reward_functions:completion_length"] == pytest.approx(step["sample_length"])
    parity = sum(completion[0] % 2 for completion in completions) / 8
    assert step["reward/tests.reward_functions:first_id_parity"] == pytest.approx(parity) and 0 < parity < 1
    for key in ("loss", "teacher_kl", "advantage"):
        assert step[key] == pytest.approx(getattr(reference, key), rel=1e-5, abs=1e-7), key
    assert step["clip_low"] == step["clip_high"] == 0, "one update per rollout: the ratio is exactly 1"
    assert "sft_loss" not in step and step["sampling_s"] > 0 and step["teacher_s"] > 0
    # SGD at lr=1: the update is minus this gradient (weights that are HF weights one to one)
    for megatron, hf in megatron_to_hf_names().items():
        grad = single["grads"][megatron]
        assert relative_error(grad[:VOCAB] if megatron.startswith("embedding") else grad,
                              reference.grads[hf]) < 5e-5, megatron


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_opd_rl_step_same_at_every_layout(setup, tmp_path, single, layout):
    fields = dict(LAYOUTS[layout])
    other = merged(run(setup, tmp_path, world=fields.pop("world"), **OPD_RL, **fields))
    expected, actual = single["steps"][0], other["steps"][0]
    for key in ("tokens", "sample_length", "reward_mean", "reward_std"):
        assert actual[key] == pytest.approx(expected[key], rel=1e-9), key
    for key in ("loss", "teacher_kl", "advantage"):
        assert actual[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert_same_update(other, single, PARITY_RTOL)


def test_several_updates_per_rollout_reuse_it_and_clip(setup, tmp_path):
    """num_iterations=2: the second step trains on the first's samples against the stored
    old log-probabilities; after an SGD step at lr=0.05 the ratio moves and some tokens clip
    (9 of 40, so the loss depends on clipped and unclipped ones). Both steps' losses and
    clip fractions against the float64 reference: HF's student moved by the reference
    gradient of the first step, on the same samples."""
    lr = 0.05
    result = merged(run(setup, tmp_path, steps=2, num_iterations=2,
                        **{**OPD_RL, "training.train_iters": 2, "optimizer.lr": lr}))
    first, second = result["steps"]
    examples = result["examples"][0]
    assert result["examples"][1] == examples, "the second step must train on the first step's samples"
    assert first["clip_low"] == first["clip_high"] == 0
    # nothing sampled at the second step: no sample metrics, the same tokens
    assert second["tokens"] == first["tokens"] and "sample_length" not in second and "sample_length" in first
    reference = reference_of(setup, examples)
    assert first["loss"] == pytest.approx(reference.loss, rel=1e-5, abs=1e-7)
    epsilon = 0.2  # the config's default, both bounds
    after = second_update_reference(setup["student"], examples, reference, lr=lr,
                                    temperature=OPD_RL["temperature"], epsilon=epsilon, epsilon_high=epsilon)
    assert 0 < after.clip_low + after.clip_high < reference.tokens, "the reference clips none or all tokens"
    assert second["loss"] == pytest.approx(after.loss, rel=1e-4, abs=1e-6)
    near_a_bound = ((after.ratios - (1 - epsilon)).abs().min().item() < 1e-4
                    or (after.ratios - (1 + epsilon)).abs().min().item() < 1e-4)
    if not near_a_bound:  # a ratio at a bound may fall either side of it in float32
        # the metrics are the clipped tokens' fractions
        assert second["clip_low"] == pytest.approx(after.clip_low / reference.tokens, rel=1e-12)
        assert second["clip_high"] == pytest.approx(after.clip_high / reference.tokens, rel=1e-12)


def test_failing_reward_function_stops_every_rank_with_its_name(setup, tmp_path):
    with pytest.raises(DistributedTestError, match=r"tests.reward_functions:raises raised on the batch of "
                                                   r"dataset rows .*KeyError"):
        run(setup, tmp_path, world=2, **{**OPD_RL, "reward_funcs": "[tests.reward_functions:raises]"})


def test_reward_functions_receive_the_rows_columns(setup, tmp_path):
    run(setup, tmp_path, **{**OPD_RL, "reward_funcs": "[tests.reward_functions:echo_columns]"})


# ----------------------------------------------------------------------------- OPSD

OPSD = {"teacher": "self", "teacher_model": "null", "training.micro_batch_size": 2,
        "max_completion_length": 4, "temperature": 1.0}
OPSD_PATHS = {"gkd": {"lmbda": 1.0}, "opd_rl": {"algorithm": "opd_rl", "num_generations": 2}}


def opsd_fields(setup: dict, path: str, **fields) -> dict:
    return {**OPSD, **OPSD_PATHS[path], "data.dataset": f"[{setup['opsd_train']}]", "data.val_dataset": "[]",
            **fields}


@pytest.mark.parametrize("path", list(OPSD_PATHS))
def test_opsd_step_same_at_tp2_and_pp2(setup, tmp_path, path):
    reference = merged(run(setup, tmp_path / "tp1", **opsd_fields(setup, path)))
    assert reference["steps"][0]["loss"] != 0
    for name in ("tp2", "pp2"):
        fields = dict(LAYOUTS[name])
        other = merged(run(setup, tmp_path / name, world=fields.pop("world"), **opsd_fields(setup, path, **fields)))
        assert other["steps"][0]["tokens"] == reference["steps"][0]["tokens"]
        assert other["steps"][0]["loss"] == pytest.approx(reference["steps"][0]["loss"], rel=1e-5)
        assert_same_update(other, reference, PARITY_RTOL)


def teacher_against_hf(argv: list[str], out: str, steps: int) -> dict:
    """One rank: the teacher's logits on a batch (via the trainer's OPSD teacher input)
    before and after `steps` steps, the teacher's inputs, and the student exported to HF."""
    from megatron_opd.config.job import load_job_config
    from megatron_opd.trainer.trainer import Trainer

    trainer = Trainer(load_job_config(None, argv))
    context = trainer.context
    examples = context.local_examples(list(range(8)), trainer.train_data, "train")
    microbatches = context.microbatches(examples)
    seen = []
    forward = trainer.teacher.forward
    trainer.teacher.forward = lambda batches, examples: seen.append(batches) or forward(batches, examples)

    def teacher_logits():
        outputs = context.teacher_forward(examples, microbatches)
        answers = [out.parts[0].answer for out in outputs]  # one teacher: one part per microbatch
        return torch.cat([(out.hidden @ out.head_weight.T).detach().clone() for out in answers])

    before = teacher_logits()
    for _ in range(steps):
        trainer.train_step()
    after = teacher_logits()
    trainer.export_hf(Path(out) / "student_hf")
    inputs = [(batch.tokens.clone(), batch.loss_mask.clone()) for batch in seen[0]]
    return {"before": before, "after": after, "examples": examples, "teacher_inputs": inputs}


def masked_hf_logits(model_dir: str, inputs) -> torch.Tensor:
    """HF transformers' logits at the masked positions of the teacher inputs."""
    return torch.cat([hf_logits(Path(model_dir), tokens[:, :-1])[mask] for tokens, mask in inputs])


@pytest.mark.parametrize("mode", ["dynamic", "fixed"])
def test_opsd_teacher_reads_teacher_prompt_and_tracks_the_right_weights(setup, tmp_path, mode):

    fields = opsd_fields(setup, "gkd", **{**SGD, "optimizer.lr": 0.5},
                         teacher_model=setup["student"] if mode == "fixed" else "null")
    argv = overrides(setup, tmp_path / "out", **fields)
    result = run_distributed(teacher_against_hf, 1, argv, str(tmp_path), steps=2, timeout=300)[0]

    # The teacher's input is teacher_prompt + response: it holds the teacher prompt's
    # tokens, and the student's prompt only where the teacher prompt itself contains it.
    tokens = torch.cat([t for t, _ in result["teacher_inputs"]])
    masks = torch.cat([m for _, m in result["teacher_inputs"]])
    for row, example in enumerate(result["examples"]):
        teacher_prompt, start = example["teacher_prompt_ids"], example["prompt_length"]
        response = example["input_ids"][start:]
        expected = teacher_prompt + response
        assert tokens[row, :len(expected)].tolist() == expected
        assert tokens[row, :len(example["input_ids"])].tolist() != example["input_ids"]
        assert masks[row].nonzero().squeeze(-1).tolist() == [len(teacher_prompt) - 1 + i
                                                             for i in range(len(response))]

    # Its logits are the HF model's on those inputs: the initial student (fixed), the
    # updated student (dynamic).
    initial = masked_hf_logits(setup["student"], result["teacher_inputs"])
    updated = masked_hf_logits(str(tmp_path / "student_hf"), result["teacher_inputs"])
    assert (updated - initial).abs().max() > 1e-2, "the student did not change"
    torch.testing.assert_close(result["before"][:, :VOCAB], initial, rtol=1e-4, atol=1e-4)
    after = result["after"][:, :VOCAB]
    torch.testing.assert_close(after, initial if mode == "fixed" else updated, rtol=1e-4, atol=1e-4)


def test_teacher_self_needs_teacher_prompts(setup, tmp_path):
    with pytest.raises(DistributedTestError, match=r"teacher=self needs a teacher_prompt in every row: 64 of 64 "
                                                   r"train rows have none"):
        run(setup, tmp_path, **{**OPSD, "lmbda": 1.0, "data.val_dataset": "[]"})


def test_fixed_self_teacher_must_be_the_student(setup, tmp_path):
    with pytest.raises(DistributedTestError, match=r"teacher_model=.* is invalid with teacher: self"):
        run(setup, tmp_path, **opsd_fields(setup, "gkd", teacher_model=setup["teacher"]))
