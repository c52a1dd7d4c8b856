"""An independent float64 reference for OPD-RL steps, from Hugging Face transformers.

Nothing here imports `megatron_opd`. From the samples a step trained on (prompt, sampled
completion, position in the global batch), the HF student and teacher on disk (float64):

    rewards        the test's reward functions, written out again (tests/reward_functions.py)
    A_base         (r - mean_group r) / (std_group r + 1e-4), Bessel's std, groups of G consecutive positions
    A_t            A_base + coef * (log p_T(y_t) - log p_old(y_t)), tempered log-probs, detached
    loss           mean over the batch's response tokens of -min(ratio A_t, clip(ratio) A_t)
    teacher_kl     mean of e^d - d - 1, d = log p_T - log p_old

`rollout_reference` gives the first step's values (ratio 1) and, by autograd, its gradient;
`second_update_reference` applies that gradient as an SGD step at `lr` to a float64 copy
of the student and gives the loss and clip counts of the next update on the same rollout.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tests.hf_models import VOCAB

GROUP_STD_EPSILON = 1e-4


@functools.lru_cache(maxsize=4)
def _hf_model(directory: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    return model.double().eval()


def reward_sum(completion: list[int]) -> float:
    """tests.reward_functions:completion_length + tests.reward_functions:first_id_parity."""
    return float(len(completion)) + (float(completion[0] % 2) if completion else 0.0)


def base_advantages(rewards: list[float], group: int) -> list[float]:
    out = []
    for start in range(0, len(rewards), group):
        values = rewards[start:start + group]
        mean = sum(values) / group
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (group - 1))
        out += [(v - mean) / (std + GROUP_STD_EPSILON) for v in values]
    return out


def _token_logprobs(model: torch.nn.Module, example: dict, temperature: float) -> torch.Tensor:
    """log p(y_t) `[T]` of the completion tokens under `model` at `temperature`."""
    ids = torch.tensor(example["input_ids"])
    start = example["prompt_length"]
    logits = model(ids[None, :-1]).logits[0, start - 1:, :VOCAB].double()
    return F.log_softmax(logits / temperature, dim=-1).gather(-1, ids[start:, None]).squeeze(-1)


@dataclass
class RolloutReference:
    tokens: int
    rewards: list[float]  # per sequence, in global-batch order
    base_advantages: list[float]  # per sequence, in global-batch order
    advantages: torch.Tensor  # [N] A_t, examples in global-batch order
    old_logprobs: torch.Tensor  # [N]
    loss: float
    advantage: float  # mean A_t
    teacher_kl: float  # mean k3
    grads: dict[str, torch.Tensor]  # HF name -> gradient of the first step's loss


def _in_batch_order(examples: list[dict]) -> list[dict]:
    return sorted(examples, key=lambda example: example["_position"])


def rollout_reference(student_dir: str, teacher_dir: str, examples: list[dict], *, group: int,
                      temperature: float, teacher_kl_coef: float) -> RolloutReference:
    examples = _in_batch_order(examples)
    student, teacher = _hf_model(student_dir), _hf_model(teacher_dir)
    completions = [example["input_ids"][example["prompt_length"]:] for example in examples]
    rewards = [reward_sum(completion) for completion in completions]
    base = base_advantages(rewards, group)
    student.zero_grad(set_to_none=True)
    logprobs = [_token_logprobs(student, example, temperature) for example in examples]
    with torch.no_grad():
        teacher_logprobs = torch.cat([_token_logprobs(teacher, example, temperature) for example in examples])
    logprobs_flat = torch.cat(logprobs)
    old = logprobs_flat.detach()
    base_per_token = torch.cat([torch.full((len(lp),), value, dtype=torch.float64)
                                for lp, value in zip(logprobs, base)])
    advantages = base_per_token + teacher_kl_coef * (teacher_logprobs - old)
    ratio = torch.exp(logprobs_flat - old)  # 1, with the gradient of log p
    loss = -(ratio * advantages).sum() / len(old)
    loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    d = teacher_logprobs - old
    return RolloutReference(len(old), rewards, base, advantages, old, loss.item(), advantages.mean().item(),
                            (torch.expm1(d) - d).mean().item(), grads)


@dataclass
class UpdateReference:
    loss: float
    clip_low: int
    clip_high: int
    ratios: torch.Tensor  # [N], to see how close any token is to a clip bound


def second_update_reference(student_dir: str, examples: list[dict], first: RolloutReference, *, lr: float,
                            temperature: float, epsilon: float, epsilon_high: float) -> UpdateReference:
    """The next update on the same rollout, after an SGD step of `lr` along `first.grads`."""
    student = copy.deepcopy(_hf_model(student_dir))
    with torch.no_grad():
        for name, param in student.named_parameters():
            param -= lr * first.grads[name]
        logprobs = torch.cat([_token_logprobs(student, example, temperature)
                              for example in _in_batch_order(examples)])
    ratio = torch.exp(logprobs - first.old_logprobs)
    advantages = first.advantages
    per_token = -torch.minimum(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon_high) * advantages)
    low = int(((ratio < 1 - epsilon) & (advantages < 0)).sum())
    high = int(((ratio > 1 + epsilon_high) & (advantages > 0)).sum())
    return UpdateReference(per_token.mean().item(), low, high, ratio)
