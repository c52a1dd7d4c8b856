"""One OPD-RL rollout batch: samples, rewards, group advantages, teacher and old log-probabilities.

Built once every `num_iterations` steps and trained on by each of them:

  1. the step's prompts (global batch / num_generations of them), each repeated
     `num_generations` times; this DP rank samples its contiguous share of the
     sequences with the student (seeded per sequence, as GKD's samples are);
  2. rewards: one rank per DP group (TP rank 0, first stage) calls the reward
     functions on its share; a sum-all-reduce over all ranks gives every rank the
     whole batch's rewards, so groups may span DP ranks and no rank can hang on
     another's failure (the failing rank raises the function's error, the others a
     pointer to it); then group-normalized advantages;
  3. the teacher's log-probabilities of the sampled tokens (its own input: OPSD's
     teacher_prompt + response) and, when the batch is trained on more than once,
     the sampling student's (`old`), each `[N]` per microbatch on the last stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from megatron.core import parallel_state

from megatron_opd.algorithms.opd_rl import RolloutTokens, group_advantages
from megatron_opd.algorithms.rewards import RewardError, compute_rewards
from megatron_opd.data import OUTPUT_COLUMNS
from megatron_opd.models.outputs import head_input, lm_head_weight
from megatron_opd.ops import fused_linear_token_logprobs
from megatron_opd.trainer.schedule import Microbatch, run_microbatches

if TYPE_CHECKING:
    from megatron_opd.trainer.trainer import Trainer


@dataclass
class RolloutBatch:
    microbatches: list[Microbatch]
    tokens: Optional[list[RolloutTokens]]  # per microbatch on the last stage, None elsewhere
    sums: dict[str, float]  # this DP rank's sums (sampled tokens, samples), reduced with the loss metrics
    metrics: dict[str, float]  # already global (rewards)


def build_rollout_batch(trainer: "Trainer", clock) -> RolloutBatch:
    config = trainer.config
    group = config.num_generations
    examples = trainer.local_examples(next(trainer.data_iterator), trainer.train_data, repeat=group)
    examples, rollout = trainer.sample_responses(examples, "student")
    trainer.timings["sampling_s"] = clock.lap()
    rewards, reward_metrics = _rewards(trainer, examples, rollout.completions)
    base = group_advantages(rewards, group) if trainer.reward_functions else torch.zeros_like(rewards).float()
    microbatches = trainer.microbatches(examples)
    teacher_outputs = trainer.teacher_forward(examples, microbatches)
    trainer.timings["teacher_s"] = clock.lap()
    old_logprobs = _student_logprobs(trainer, microbatches) if config.num_iterations > 1 else None
    tokens = None
    if parallel_state.is_pipeline_last_stage():
        local_base = base[[example["_position"] for example in examples]].to(trainer.runtime.device)
        tokens = []
        size = config.training.micro_batch_size
        for index, batch in enumerate(microbatches):
            mask = batch.loss_mask.to(trainer.runtime.device)
            rows = local_base[index * size:(index + 1) * size]
            teacher_logprobs = None
            if teacher_outputs is not None:
                teacher_logprobs = teacher_outputs[index].token_logprobs(
                    batch.labels.to(mask.device)[mask], temperature=config.temperature, vocab_size=trainer.vocab_size)
            tokens.append(RolloutTokens(rows.unsqueeze(1).expand(mask.shape)[mask], teacher_logprobs,
                                        old_logprobs[index] if old_logprobs is not None else None))
    sums = {"sampled_tokens": rollout.num_tokens, "samples": len(rollout.completions)}
    return RolloutBatch(microbatches, tokens, sums, reward_metrics)


def _rewards(trainer: "Trainer", examples: list[dict], completions: list[list[int]]
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """`[global batch]` summed rewards (zeros without reward functions) and their metrics."""
    functions = trainer.reward_functions
    if not functions:
        return torch.zeros(trainer.config.training.global_batch_size, dtype=torch.float64), {}
    table = torch.zeros(len(functions), trainer.config.training.global_batch_size, dtype=torch.float64)
    failed = torch.zeros(1, dtype=torch.float64)
    error: Optional[RewardError] = None
    if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.is_pipeline_first_stage():
        tokenizer = trainer.tokenizer
        columns = {name: [example[name] for example in examples]
                   for name in examples[0] if name not in OUTPUT_COLUMNS and not name.startswith("_")}
        prompts = [tokenizer.decode(example["input_ids"][:example["prompt_length"]], skip_special_tokens=True)
                   for example in examples]
        texts = [tokenizer.decode(completion, skip_special_tokens=True) for completion in completions]
        rows = [example["_row"] for example in examples]
        try:
            values = compute_rewards(functions, prompts, texts, [list(c) for c in completions], columns, rows)
            positions = [example["_position"] for example in examples]
            table[:, positions] = torch.tensor(values, dtype=torch.float64)
        except RewardError as caught:
            error, failed[0] = caught, 1.0
    device = trainer.runtime.device
    reduced = torch.cat([table.view(-1), failed]).to(device)
    torch.distributed.all_reduce(reduced)
    if error is not None:
        raise error
    if reduced[-1].item() > 0:
        raise RewardError("a reward function failed on another rank (see the first error in the log)")
    table = reduced[:-1].view(table.shape).cpu()
    rewards = table.sum(dim=0)
    metrics = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item()}
    if len(functions) > 1:
        metrics.update({f"reward/{function.name}": row.mean().item() for function, row in zip(functions, table)})
    return rewards, metrics


@torch.no_grad()
def _student_logprobs(trainer: "Trainer", microbatches: list[Microbatch]) -> Optional[list[torch.Tensor]]:
    """log p_old of each microbatch's response tokens `[N]` (last stage), in eval mode."""
    outputs: list[Optional[torch.Tensor]] = [None] * len(microbatches)
    model = trainer.model

    def keep(index: int, batch: Microbatch, hidden: torch.Tensor):
        mask = batch.loss_mask
        outputs[index] = fused_linear_token_logprobs(
            head_input(model, hidden)[mask], lm_head_weight(model), batch.labels[mask],
            temperature=trainer.config.temperature, vocab_size=trainer.vocab_size)
        return hidden.new_zeros(()), {}

    was_training = model.training
    model.eval()
    try:
        result = run_microbatches(model, microbatches, keep, forward_only=True)
    finally:
        model.train(was_training)
    return outputs if result is not None else None
