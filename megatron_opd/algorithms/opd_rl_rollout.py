"""OPD-RL on the shared loop: a rollout batch every `num_iterations` steps, trained on by each of them.

Building a rollout batch (`OPDRL.responses`, then `OPDRL.teacher_signal`):

  1. the step's prompts (global batch / num_generations of them), each repeated
     `num_generations` times; this DP rank samples its contiguous share of the
     sequences with the student (seeded per sequence, as GKD's samples are);
  2. rewards: one rank per DP group (TP rank 0, first stage) calls the reward
     functions on its share; a sum-all-reduce over all ranks gives every rank the
     whole batch's rewards, so groups may span DP ranks, and a failure there is agreed
     on by every rank first (`runtime.agreement`); then group-normalized advantages;
  3. the teacher's log-probabilities of the sampled tokens (its own input: OPSD's
     teacher_prompt + response) and, when the batch is trained on more than once,
     the sampling student's (`old`, always Megatron's, whatever engine sampled), each
     `[N]` per microbatch on the last stage; with vLLM, also vLLM's own log-probs of the
     samples (truncated importance sampling, `rollout_importance_sampling_cap`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_opd.algorithms.base import Algorithm, MicrobatchLoss, Responses
from megatron_opd.algorithms.context import StepContext
from megatron_opd.algorithms.opd_rl import OPDRLLoss, RolloutTokens, TeacherKL, group_advantages
from megatron_opd.algorithms.rewards import RewardError, RewardFunction, compute_rewards
from megatron_opd.config.job import JobConfig
from megatron_opd.data import OUTPUT_COLUMNS
from megatron_opd.runtime.agreement import run_agreed
from megatron_opd.teachers.outputs import as_mix


@dataclass
class RolloutBatch:
    responses: Responses
    base_advantages: torch.Tensor  # [global batch] per sequence
    rollout_logprobs: Optional[list[torch.Tensor]] = None  # the engine's, `[N]` per microbatch (vLLM)
    tokens: Optional[list[RolloutTokens]] = None  # per microbatch on the last stage, once computed
    signal_ready: bool = False  # set on every rank (the signal's passes are collective over PP)


class OPDRL(Algorithm):
    """GRPO over student rollouts with the teacher's log-ratio in each token's advantage."""

    samples = True

    def __init__(self, config: JobConfig, vocab_size: int, reward_functions: list[RewardFunction]):
        self.config, self.reward_functions = config, reward_functions
        self.group_size = config.num_generations
        self.loss = OPDRLLoss(epsilon=config.epsilon, epsilon_high=config.epsilon_high,
                              teacher_kl_coef=config.teacher_kl_coef, temperature=config.temperature,
                              vocab_size=vocab_size, opsd_clip=config.opsd_clip,
                              importance_sampling_cap=config.rollout_importance_sampling_cap)
        self.batch: Optional[RolloutBatch] = None

    def responses(self, context: StepContext, iteration: int) -> Responses:
        if iteration % self.config.num_iterations == 0:
            self.batch = self._sample(context, iteration)
            return self.batch.responses
        if self.batch is None:
            raise RuntimeError(f"iteration {iteration} is inside a rollout batch that was never built "
                               f"(num_iterations={self.config.num_iterations})")
        # Counted at the first step; the mismatch too (the weights moved since the samples were drawn).
        return dataclasses.replace(self.batch.responses, sums={}, metrics={}, rollout_logprobs=None)

    def _sample(self, context: StepContext, iteration: int) -> RolloutBatch:
        examples = context.next_examples(repeat=self.group_size)
        examples, rollout = context.sample_responses(examples, "student", iteration)
        rewards, metrics = self._rewards(context, examples, rollout.completions)
        base = group_advantages(rewards, self.group_size) if self.reward_functions else torch.zeros_like(rewards).float()
        sums = {"sampled_tokens": rollout.num_tokens, "samples": len(rollout.completions)}
        metrics.update(rollout.extra)
        microbatches = context.microbatches(examples)
        rollout_logprobs = (context.microbatch_token_values(rollout.logprobs, microbatches)
                            if rollout.logprobs is not None else None)
        responses = Responses(examples, microbatches, "student", sums, metrics, rollout_logprobs)
        return RolloutBatch(responses, base, rollout_logprobs=rollout_logprobs)

    def teacher_signal(self, context: StepContext, responses: Responses) -> Optional[list[RolloutTokens]]:
        batch = self.batch
        if not batch.signal_ready:
            batch.tokens = self._tokens(context, batch)
            batch.signal_ready = True
        return batch.tokens

    def _tokens(self, context: StepContext, batch: RolloutBatch) -> Optional[list[RolloutTokens]]:
        examples, microbatches = batch.responses.examples, batch.responses.microbatches
        teacher_outputs = context.teacher_forward(examples, microbatches)
        old_logprobs = context.student_token_logprobs(microbatches) if self.config.num_iterations > 1 else None
        if not parallel_state.is_pipeline_last_stage():
            return None
        device = context.runtime.device
        local_base = batch.base_advantages[[example["_position"] for example in examples]].to(device)
        tokens = []
        for index, microbatch in enumerate(microbatches):
            mask = microbatch.loss_mask.to(device)
            rows = local_base[list(microbatch.rows)]  # per example; its tokens follow in mask order
            teacher_logprobs, groups = None, []
            if teacher_outputs is not None:  # each row's log-ratio against its own teacher
                mix = as_mix(teacher_outputs[index], self.config.temperature, None)
                teacher_logprobs = mix.token_logprobs(microbatch.labels.to(device)[mask],
                                                      vocab_size=context.vocab_size)
                groups = mix.groups()
            counts = torch.tensor(microbatch.example_token_counts(), device=device)
            tokens.append(RolloutTokens(rows.repeat_interleave(counts), teacher_logprobs,
                                        old_logprobs[index] if old_logprobs is not None else None,
                                        batch.rollout_logprobs[index] if batch.rollout_logprobs is not None else None,
                                        groups))
        return tokens

    def _rewards(self, context: StepContext, examples: list[dict], completions: list[list[int]]
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """`[global batch]` summed rewards (zeros without reward functions) and their metrics."""
        functions = self.reward_functions
        global_batch = self.config.training.global_batch_size
        if not functions:
            return torch.zeros(global_batch, dtype=torch.float64), {}
        table = torch.zeros(len(functions), global_batch, dtype=torch.float64)

        def score() -> None:
            tokenizer = context.tokenizer
            columns = {name: [example[name] for example in examples]
                       for name in examples[0] if name not in OUTPUT_COLUMNS and not name.startswith("_")}
            prompts = [tokenizer.decode(example["input_ids"][:example["prompt_length"]], skip_special_tokens=True)
                       for example in examples]
            texts = [tokenizer.decode(completion, skip_special_tokens=True) for completion in completions]
            values = compute_rewards(functions, prompts, texts, [list(c) for c in completions], columns,
                                     [example["_row"] for example in examples])
            table[:, [example["_position"] for example in examples]] = torch.tensor(values, dtype=torch.float64)

        scores_here = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.is_pipeline_first_stage()
        run_agreed(score, runs_here=scores_here, catch=(RewardError,), device=context.runtime.device,
                   elsewhere=lambda: RewardError("a reward function failed on another rank "
                                                 "(see the first error in the log)"))
        reduced = table.to(context.runtime.device)
        torch.distributed.all_reduce(reduced)
        table = reduced.cpu()
        rewards = table.sum(dim=0)
        metrics = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item()}
        if len(functions) > 1:
            metrics.update({f"reward/{function.name}": row.mean().item() for function, row in zip(functions, table)})
        return rewards, metrics

    def microbatch_loss(self, responses: Responses) -> MicrobatchLoss:
        return self.loss

    @property
    def eval_loss(self) -> MicrobatchLoss:
        return TeacherKL(temperature=self.config.temperature, vocab_size=self.loss.vocab_size)
