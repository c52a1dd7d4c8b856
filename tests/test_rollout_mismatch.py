"""The train/inference mismatch metrics: what a step logs when its samples come with the
engine's own log-probs (vLLM's), checked without vLLM.

A stand-in engine samples with the Megatron sampler and reports log-probs it makes up
(each token's is -1 - 0.1 * its index in the completion). The logged mean and max
|log p_trainer - log p_engine| must then be those of HF transformers' float64 student
(temperature-scaled, same weights) on exactly the step's samples, over both DP ranks.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.testing import run_distributed
from tests.gkd_setup import make_gkd_setup, overrides
from tests.hf_models import VOCAB

TEMPERATURE = 1.5


def made_up_logprobs(completion: list[int]) -> list[float]:
    return [-1.0 - 0.1 * index for index in range(len(completion))]


class MadeUpLogprobsEngine:
    """The Megatron sampler's samples, with log-probs that are not the trainer's."""

    def __init__(self, sampler):
        self.sampler = sampler

    def generate(self, prompts, params, seeds=None):
        rollout = self.sampler.generate(prompts, params, seeds)
        rollout.logprobs = [made_up_logprobs(completion) for completion in rollout.completions]
        return rollout

    def weights_changed(self) -> None:
        pass

    def close(self) -> None:
        pass


def step_on_rank(argv: list[str]) -> dict:
    from megatron_opd.config.job import load_job_config
    from megatron_opd.rollout import MegatronSampler
    from megatron_opd.trainer.trainer import Trainer

    trainer = Trainer(load_job_config(None, argv))
    trainer.context.engine_factory = lambda source: MadeUpLogprobsEngine(MegatronSampler(trainer.model, VOCAB))
    examples = []
    responses = trainer.algorithm.responses

    def capture(context, iteration):
        out = responses(context, iteration)
        examples.extend({"input_ids": e["input_ids"], "prompt_length": e["prompt_length"]} for e in out.examples)
        return out

    trainer.algorithm.responses = capture
    return {"step": trainer.train_step(), "examples": examples}


def hf_sample_logprobs(model_dir: str, examples: list[dict]) -> list[list[float]]:
    """HF float64 log p(y_t | prefix) at TEMPERATURE of each example's sampled tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager")
    result = []
    with torch.no_grad():
        for example in examples:
            ids, start = example["input_ids"], example["prompt_length"]
            logits = model(torch.tensor([ids])).logits[0, :, :VOCAB] / TEMPERATURE
            logprobs = torch.log_softmax(logits, dim=-1)
            result.append([logprobs[position - 1, ids[position]].item() for position in range(start, len(ids))])
    return result


@pytest.mark.parametrize("algorithm", ["gkd", "opd_rl"])
def test_mismatch_metrics_match_hf_reference(tmp_path, algorithm):
    setup = make_gkd_setup(tmp_path / "setup")
    fields = {"lmbda": 1.0, "max_completion_length": 6, "temperature": TEMPERATURE, "training.train_iters": 1}
    if algorithm == "opd_rl":
        fields.update({"algorithm": "opd_rl", "lmbda": 0.5, "num_generations": 2, "teacher_kl_coef": 1.0})
    results = run_distributed(step_on_rank, 2, overrides(setup, tmp_path / "out", **fields), timeout=300)
    step = next(result["step"] for result in results if result["step"])
    examples = [example for result in results for example in result["examples"]]
    assert len(examples) == 8
    reference = hf_sample_logprobs(setup["student"], examples)
    differences = [abs(mine - engine) for example, row in zip(examples, reference)
                   for mine, engine in zip(row, made_up_logprobs(example["input_ids"][example["prompt_length"]:]))]
    assert len(differences) == step["tokens"]
    assert step["rollout_logprob_diff"] == pytest.approx(sum(differences) / len(differences), rel=1e-5)
    assert step["rollout_logprob_diff_max"] == pytest.approx(max(differences), rel=1e-5)
