"""The toolbox an algorithm's step uses: this DP rank's examples, sampled responses,
microbatches, the teacher's forward, and student forward passes through Megatron's schedule.

One object per run, built by the trainer; it holds no per-step state except the data
iterator's position (saved in checkpoints by the trainer). Its rollout engines
(`rollout.engine`: the Megatron sampler, or vLLM with weight sync) start on first use.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from megatron.core import parallel_state

from megatron_opd.config.job import JobConfig
from megatron_opd.data import DataIterator, local_batch, pad_token_id, teacher_example
from megatron_opd.models.outputs import head_input, lm_head_weight
from megatron_opd.ops import fused_linear_token_logprobs
from megatron_opd.pipeline import Microbatch, collect_forward_only, make_microbatches, run_microbatches
from megatron_opd.rollout import Rollout, RolloutEngine, SamplingParams, eos_token_ids
from megatron_opd.runtime import Runtime
from megatron_opd.runtime.seeds import sample_seed

ResponseSource = Literal["student", "teacher", "dataset"]

# (student_hidden [b, s, H], student_head [V/tp, H], labels [b, s], loss_mask [b, s], signal) ->
# (summed loss, counted tokens, metric sums named `<metric>_sum`, plus `tokens`)
MicrobatchLoss = Callable[..., tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


# source ("student" / "teacher") -> its engine; called once per source, on every rank
EngineFactory = Callable[[ResponseSource], RolloutEngine]


class StepContext:
    def __init__(self, config: JobConfig, runtime: Runtime, model: torch.nn.Module, teacher, tokenizer,
                 vocab_size: int, tokenizer_dir: Path, train_data, data_iterator: DataIterator,
                 engine_factory: EngineFactory, routes: Optional[dict[str, list[int]]] = None):
        # teacher: the run's `teachers.TeacherSet` (None without one); routes: per split, each
        # dataset row's teacher index in it (None: one teacher, every row its)
        self.config, self.runtime, self.model, self.teacher = config, runtime, model, teacher
        self.routes = routes or {}
        self.tokenizer, self.vocab_size, self.tokenizer_dir = tokenizer, vocab_size, tokenizer_dir
        self.train_data, self.data_iterator = train_data, data_iterator
        self.pad_id = pad_token_id(tokenizer)
        self.data_parallel_size = config.check_world(runtime.world_size)
        self.engine_factory = engine_factory
        self.engines: dict[str, RolloutEngine] = {}

    # ------------------------------------------------------------------ examples

    def local_examples(self, indices: list[int], dataset, split: str, repeat: int = 1) -> list[dict]:
        """This DP rank's contiguous share of a global batch's rows, each row `repeat` times in
        a row (OPD-RL's groups), with its position in the global batch (`_position`, what its
        sampling seed derives from), its dataset row (`_row`), split (`_split`) and, with several
        teachers, its teacher's index (`_teacher`)."""
        positions = local_batch(list(range(len(indices) * repeat)), parallel_state.get_data_parallel_rank(),
                                self.data_parallel_size)
        rows = [indices[position // repeat] for position in positions]
        # One columnar read of all rows: a `datasets` row read costs ~20 us of Arrow slicing each.
        columns = dataset[rows]
        examples = [{**dict(zip(columns, values)), "_position": position, "_row": row, "_split": split}
                    for position, row, values in zip(positions, rows, zip(*columns.values()))]
        if split in self.routes:
            for example in examples:
                example["_teacher"] = self.routes[split][example["_row"]]
        return examples

    def next_examples(self, repeat: int = 1) -> list[dict]:
        """The next training batch's rows on this DP rank (advances the data iterator)."""
        return self.local_examples(next(self.data_iterator), self.train_data, "train", repeat)

    def microbatches(self, examples: list[dict]) -> list[Microbatch]:
        """`examples` as microbatches (fixed rows or a token budget: `pipeline.batching`); each
        microbatch's `rows` say which examples it holds."""
        return make_microbatches(examples, self.pad_id, self.config, self.runtime.device.type)

    # ------------------------------------------------------------------ responses

    @functools.cached_property
    def sampling(self) -> SamplingParams:
        """How responses are sampled (on-policy steps, seq_kd, evaluations on samples)."""
        config = self.config
        return SamplingParams(max_new_tokens=config.max_completion_length, temperature=config.temperature,
                              top_k=config.top_k, eos_token_ids=eos_token_ids(self.tokenizer, self.tokenizer_dir))

    def sample_responses(self, examples: list[dict], source: ResponseSource, iteration: int
                         ) -> tuple[list[dict], Rollout]:
        """`examples` with their responses replaced by samples of the student or the teacher
        for the same prompts (loss on every sampled token, EOS included), seeded by
        (seed, `iteration`, position in the global batch)."""
        prompts = [example["input_ids"][:example["prompt_length"]] for example in examples]
        seeds = [sample_seed(self.config.parallel.seed, iteration, example["_position"]) for example in examples]
        if source == "student":
            rollout = self.engine("student").generate(prompts, self.sampling, seeds)
        else:
            with self.teacher.on_device():
                rollout = self.engine("teacher").generate(prompts, self.sampling, seeds)
        sampled = [{**example, "input_ids": list(prompt) + completion,
                    "loss_mask": [0] * len(prompt) + [1] * len(completion)}
                   for example, prompt, completion in zip(examples, prompts, rollout.completions)]
        return sampled, rollout

    def engine(self, source: ResponseSource) -> RolloutEngine:
        """The engine sampling `source`'s responses (started on first use, on every rank)."""
        if source not in self.engines:
            self.engines[source] = self.engine_factory(source)
        return self.engines[source]

    def weights_changed(self) -> None:
        """After an optimizer step: the student's engine re-syncs before it samples again."""
        if "student" in self.engines:
            self.engines["student"].weights_changed()

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()

    def microbatch_token_values(self, per_example: list[list[float]], microbatches: list[Microbatch]
                                ) -> list[torch.Tensor]:
        """Per-example values of the response tokens -> `[N]` per microbatch (its rows in
        order, row-major over the loss mask, as the losses flatten it), on the last stage's device."""
        return [torch.tensor([value for row in batch.rows for value in per_example[row]],
                             dtype=torch.float32, device=self.runtime.device)
                for batch in microbatches]

    # ------------------------------------------------------------------ forward passes

    def teacher_forward(self, examples: list[dict], microbatches: list[Microbatch]) -> Optional[list]:
        """The teacher's output for the step's microbatches (None without a teacher); rows
        with a teacher_prompt are fed to it as teacher_prompt + response (OPSD)."""
        if self.teacher is None:
            return None
        if any(example.get("teacher_prompt_ids") is not None for example in examples):
            # Other prompt lengths, the same rows in each microbatch: the teacher's answers align
            microbatches = make_microbatches([teacher_example(example) for example in examples], self.pad_id,
                                             self.config, self.runtime.device.type,
                                             rows=[batch.rows for batch in microbatches])
        return self.teacher.forward(microbatches, examples)

    def student_token_logprobs(self, microbatches: list[Microbatch]) -> Optional[list[torch.Tensor]]:
        """log p of each microbatch's response tokens `[N]` under the student's current weights
        (tempered, in eval mode, no gradient), on the last stage; None elsewhere."""
        def keep(index: int, batch: Microbatch, hidden: torch.Tensor) -> torch.Tensor:
            mask = batch.loss_mask
            return fused_linear_token_logprobs(head_input(self.model, hidden)[mask], lm_head_weight(self.model),
                                               batch.labels[mask], temperature=self.config.temperature,
                                               vocab_size=self.vocab_size)

        return collect_forward_only(self.model, microbatches, keep)

    def student_pass(self, microbatches: list[Microbatch], signals: Optional[list], loss: MicrobatchLoss,
                     forward_only: bool, rollout_logprobs: Optional[list[torch.Tensor]] = None
                     ) -> Optional[list[dict]]:
        """The student's forward (and backward) of every microbatch with `loss` on its final
        hidden states and `signals[index]`; the loss metrics per microbatch on the last stage.
        `rollout_logprobs` (`[N]` per microbatch, the sampling engine's log-probs of the
        responses): adds the train/inference mismatch metrics (`rollout_mismatch`)."""
        def microbatch_loss(index: int, batch: Microbatch, hidden: torch.Tensor):
            signal = signals[index] if signals is not None else None
            student_hidden, student_head = head_input(self.model, hidden), lm_head_weight(self.model)
            result = loss(student_hidden, student_head, batch.labels, batch.loss_mask, signal)
            if rollout_logprobs is not None:
                mask = batch.loss_mask.bool()
                with torch.no_grad():
                    logprobs = fused_linear_token_logprobs(student_hidden[mask].detach(), student_head.detach(),
                                                           batch.labels[mask], temperature=self.config.temperature,
                                                           vocab_size=self.vocab_size)
                result[2].update(rollout_mismatch(logprobs, rollout_logprobs[index]))
            return result

        return run_microbatches(self.model, microbatches, microbatch_loss, forward_only=forward_only)


def rollout_mismatch(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
    """|log p_trainer - log p_engine| of each sampled token `[N]`, as metric sums: its mean
    per response token (`rollout_logprob_diff`) and its max over the step (`..._max`)."""
    if trainer_logprobs.shape != rollout_logprobs.shape:
        raise ValueError(f"the rollout engine returned {rollout_logprobs.numel()} log-probs for a microbatch "
                         f"of {trainer_logprobs.numel()} response tokens")
    difference = (trainer_logprobs.double() - rollout_logprobs.to(trainer_logprobs.device).double()).abs()
    largest = difference.max() if difference.numel() else difference.new_zeros(())
    return {"rollout_logprob_diff_sum": difference.sum(), "rollout_logprob_diff_max": largest}
