"""The shared training loop: data -> responses -> teacher signal -> student forward-backward -> optimizer step.

One step on every rank:
  1. the global batch's example ids (`DataIterator`, identical on all ranks); this DP
     rank takes its contiguous share;
  2. the responses: the dataset's, or (GKD's `lmbda` / `seq_kd`, one decision per step)
     fresh samples of the student or the teacher for the same prompts
     (`rollout.MegatronSampler`, seeded per example, no gradient); padded and split
     into microbatches;
  3. the teacher forward-only over those microbatches (`LocalTeacher`; OPSD: over the
     same responses after each row's teacher_prompt), its final hidden states at the
     response tokens kept on the last stage;
  4. the student's forward-backward through Megatron's schedule with the algorithm's
     loss reading the teacher's output for its microbatch; per-token normalization
     over the whole global batch (`calculate_per_token_loss`);
  5. Megatron's optimizer step (grad clipping, fp32 master weights) and LR schedule.
OPD-RL replaces 2-3 by a rollout batch (`opd_rl_rollout`: G samples per prompt,
rewards, advantages, teacher log-probabilities) that `num_iterations` steps train on.
Metrics each `log_interval`, held-out divergence each `eval_interval`, atomic
dist-checkpoints each `save_interval` and at the end, resume from the latest, and a
final HF export of the student.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
from megatron.core import parallel_state

from megatron_opd.algorithms.gkd import GKDLoss, ResponseSource, response_source
from megatron_opd.algorithms.opd_rl import OPDRLLoss
from megatron_opd.algorithms.opsd import check_teacher_prompts
from megatron_opd.algorithms.rewards import load_reward_functions
from megatron_opd.algorithms.sft import SFTLoss
from megatron_opd.checkpoint.hf_weights import write_hf_weights
from megatron_opd.checkpoint.megatron_checkpoint import (
    CheckpointInfo,
    atomic_output_dir,
    copy_hf_side_files,
    dtype_name,
)
from megatron_opd.checkpoint.pretrained import load_pretrained
from megatron_opd.config.schema import ConfigError, to_dict
from megatron_opd.config.train import TrainConfig
from megatron_opd.data import DataIterator, OUTPUT_COLUMNS, pad_token_id, teacher_example
from megatron_opd.models.outputs import head_input, lm_head_weight
from megatron_opd.rollout import MegatronSampler, Rollout, SamplingParams
from megatron_opd.runtime.distributed import Runtime, initialize_runtime, seed_everything
from megatron_opd.teachers import LocalTeacher, TeacherSource
from megatron_opd.trainer.checkpointing import latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from megatron_opd.trainer.metrics import MetricsWriter
from megatron_opd.trainer.opd_rl_rollout import RolloutBatch, build_rollout_batch
from megatron_opd.trainer.optim import build_optimizer, wrap_student
from megatron_opd.trainer.schedule import Microbatch, run_microbatches
from megatron_opd.trainer.setup import make_microbatches, remote_teacher, resolve_models, tokenized_split

_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_supported(config: TrainConfig) -> None:
    """Cross-field rules that need the file system, naming the field (never a silent fallback)."""
    has_teacher = any(value is not None for value in
                      (config.teacher_model, config.teacher_model_server, config.teacher_cache))
    if config.algorithm == "gkd" and not has_teacher and config.teacher != "self":
        raise ConfigError("teacher_model=None is invalid: GKD needs a teacher (an HF dir or megatron_opd "
                          "checkpoint, teacher_model_server or teacher_cache), or teacher: self with a "
                          "teacher_prompt column (OPSD)")
    if config.teacher == "self" and config.teacher_model is not None:
        if Path(config.teacher_model).resolve() != Path(config.model).resolve():
            raise ConfigError(f"teacher_model={config.teacher_model!r} is invalid with teacher: self: a fixed "
                              f"self-teacher is the student's own initial weights (model={config.model!r}); "
                              "leave it null for the dynamic teacher, or use teacher: model for another model")


def resolve_dtype(precision: str, runtime: Runtime) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if runtime.device.type == "cuda" else torch.float32
    return _PRECISION[precision]


def resolve_distributed_optimizer(requested: Optional[bool], optimizer: str) -> bool:
    """Megatron's DistributedOptimizer needs Transformer Engine's or Apex's Adam to checkpoint
    exactly (with torch's Adam, 0.16 loses state on resume): on by default where they exist."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    if requested is None:
        return HAVE_APEX_OR_TE and optimizer == "adam"
    if requested and not HAVE_APEX_OR_TE:
        raise ConfigError("optimizer.use_distributed_optimizer=True is invalid without Transformer Engine or "
                          "Apex: Megatron-Core's DistributedOptimizer does not resume torch's Adam state "
                          "exactly; set it to false or null")
    return requested


def eos_token_ids(tokenizer, model_dir: Path) -> tuple[int, ...]:
    """Ids that end a sampled response: the tokenizer's EOS and the model's
    `generation_config.json` ones (instruct models stop on e.g. Qwen's <|im_end|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    generation_config = model_dir / "generation_config.json"
    if generation_config.is_file():
        value = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if not ids:
        raise ConfigError(f"the tokenizer of {model_dir} has no EOS token and no generation_config.json "
                          "eos_token_id: sampled responses (lmbda > 0 or seq_kd) could not end")
    return tuple(sorted(int(i) for i in ids))


def sample_seed(seed: int, iteration: int, position: int) -> int:
    """The sampling seed of the example at `position` of step `iteration`'s global batch:
    independent of the DP split, the microbatching and the TP/PP layout."""
    digest = hashlib.blake2b(f"sample/{seed}/{iteration}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _Stopwatch:
    """Seconds spent in each phase of a step (sampling, teacher, student, optimizer)."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()

    def lap(self) -> float:
        now = time.monotonic()
        elapsed, self.last = now - self.last, now
        return elapsed

    @property
    def total(self) -> float:
        return self.last - self.started


class Trainer:
    def __init__(self, config: TrainConfig, runtime: Optional[Runtime] = None):
        check_supported(config)
        self.config = config
        models = resolve_models(config)
        self.runtime = runtime or initialize_runtime(config.parallel)
        self.dtype = resolve_dtype(config.training.precision, self.runtime)
        self.student_source, self.tokenizer, self.vocab_size = models.student, models.tokenizer, models.vocab_size
        # A teacher that is not loaded here is checked before the student is: a server that
        # is down or a cache built for other data fails the run in seconds.
        self.teacher: Optional[TeacherSource] = remote_teacher(config, models, self.runtime)

        student = load_pretrained(models.student, self.runtime, "student", self.dtype)
        optimizer_config = dataclasses.replace(
            config.optimizer, use_distributed_optimizer=resolve_distributed_optimizer(config.optimizer.use_distributed_optimizer, config.optimizer.optimizer))
        self.model = wrap_student(student, optimizer_config.use_distributed_optimizer)
        if models.teacher is not None:
            teacher = load_pretrained(models.teacher, self.runtime, "teacher", self.dtype)
            self.teacher = LocalTeacher(teacher, offload=config.offload_teacher_model)
        elif config.teacher == "self":
            self.teacher = LocalTeacher(self.model, is_student=True)
        self.optimizer, self.scheduler = build_optimizer(self.model, optimizer_config, config.training.train_iters)
        self.loss = self._build_loss()
        self.reward_functions = load_reward_functions(config.reward_funcs)
        self.samples_responses = config.algorithm == "opd_rl" or (
            config.algorithm == "gkd" and (config.lmbda > 0 or config.seq_kd))
        if self.samples_responses:
            self.sampling  # a tokenizer without EOS fails now, not at the first sampled step

        self.train_data = self._dataset("train")
        self.eval_data = self._dataset("val") if config.data.val_dataset else None
        # OPD-RL: a step's global batch is global_batch_size / num_generations prompts, each sampled G times
        self.group_size = config.num_generations if config.algorithm == "opd_rl" else 1
        self.data_iterator = DataIterator(self.train_data, config.training.global_batch_size // self.group_size,
                                          seed=config.data.seed, shuffle=config.data.shuffle)
        self.rollout_batch: Optional[RolloutBatch] = None
        self.timings: dict[str, float] = {}
        self.pad_id = pad_token_id(self.tokenizer)
        self.data_parallel_size = config.check_world(self.runtime.world_size)
        self.iteration = 0
        self.metrics = MetricsWriter(config.training.output_dir, enabled=self._is_logging_rank(),
                                     tensorboard=config.training.tensorboard, total_steps=config.training.train_iters)
        if config.training.resume:
            self._resume()

    # ------------------------------------------------------------------ setup

    @functools.cached_property
    def sampling(self) -> SamplingParams:
        """How responses are sampled (on-policy steps, seq_kd, evaluations on samples)."""
        config = self.config
        return SamplingParams(max_new_tokens=config.max_completion_length, temperature=config.temperature,
                              top_k=config.top_k,
                              eos_token_ids=eos_token_ids(self.tokenizer, self.student_source.tokenizer_dir))

    def _build_loss(self):
        config = self.config
        if config.algorithm == "sft":
            return SFTLoss(vocab_size=self.vocab_size)
        if config.algorithm == "opd_rl":
            return OPDRLLoss(epsilon=config.epsilon, epsilon_high=config.clip_high,
                             teacher_kl_coef=config.teacher_kl_coef, temperature=config.temperature,
                             vocab_size=self.vocab_size, log_ratio_clip=config.opsd_clip)
        return GKDLoss(beta=config.beta, temperature=config.temperature, sft_alpha=config.sft_alpha,
                       topk=config.gkd_logits_topk, vocab_size=self.vocab_size, clip=config.opsd_clip)

    def _dataset(self, split: str):
        dataset = tokenized_split(self.config, self.tokenizer, split, self.runtime.rank)
        if len(dataset) < self.config.training.global_batch_size and split == "train":
            raise ConfigError(f"training.global_batch_size={self.config.training.global_batch_size} is invalid: "
                              f"the training data has only {len(dataset)} usable rows")
        if self.config.teacher == "self":
            check_teacher_prompts(dataset["teacher_prompt_ids"], split)
        if self.config.reward_funcs:
            return dataset  # reward functions read the rows' own columns
        return dataset.select_columns(list(OUTPUT_COLUMNS))

    def _is_logging_rank(self) -> bool:
        return (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0)

    def _checkpoint_info(self) -> CheckpointInfo:
        source = self.student_source
        return CheckpointInfo(model=source.model, family=source.family, dtype=dtype_name(self.dtype),
                              hf_config=source.hf_config)

    def _resume(self) -> None:
        path = latest_checkpoint(self.config.training.output_dir)
        if path is None:
            return
        state = load_training_checkpoint(path, self.model, self.optimizer)
        self.iteration = state["iteration"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_iterator.load_state_dict(state["data"])
        if self.runtime.rank == 0:
            print(f"resumed from {path} at iteration {self.iteration}", flush=True)

    # ------------------------------------------------------------------ batches

    def local_examples(self, indices: list[int], dataset, repeat: int = 1) -> list[dict]:
        """This DP rank's contiguous share of a global batch's rows, each row `repeat` times
        in a row (OPD-RL's groups), with its position in the global batch (`_position`, what
        its sampling seed derives from), its dataset row (`_row`) and split (`_split`)."""
        share = len(indices) * repeat // self.data_parallel_size
        first = parallel_state.get_data_parallel_rank() * share
        split = "train" if dataset is self.train_data else "val"
        return [{**dataset[indices[position // repeat]], "_position": position, "_row": indices[position // repeat],
                 "_split": split} for position in range(first, first + share)]

    def microbatches(self, examples: list[dict]) -> list[Microbatch]:
        return make_microbatches(examples, self.pad_id, self.config)

    def sample_responses(self, examples: list[dict], source: ResponseSource,
                         iteration: Optional[int] = None) -> tuple[list[dict], Rollout]:
        """`examples` with their responses replaced by samples of the student or the teacher
        for the same prompts (loss on every sampled token, EOS included). Seeded by
        (seed, `iteration` (default: the current one), position in the global batch)."""
        prompts = [example["input_ids"][:example["prompt_length"]] for example in examples]
        iteration = self.iteration if iteration is None else iteration
        seeds = [sample_seed(self.config.parallel.seed, iteration, example["_position"]) for example in examples]
        if source == "student":
            rollout = MegatronSampler(self.model, self.vocab_size).generate(prompts, self.sampling, seeds)
        else:
            with self.teacher.on_device() as teacher:
                rollout = MegatronSampler(teacher, self.vocab_size).generate(prompts, self.sampling, seeds)
        sampled = [{**example, "input_ids": list(prompt) + completion,
                    "loss_mask": [0] * len(prompt) + [1] * len(completion)}
                   for example, prompt, completion in zip(examples, prompts, rollout.completions)]
        return sampled, rollout

    def teacher_forward(self, examples: list[dict], microbatches: list[Microbatch]):
        """The teacher's output for the step's microbatches (None without a teacher); rows
        with a teacher_prompt are fed to it as teacher_prompt + response (OPSD)."""
        if self.teacher is None:
            return None
        if any(example.get("teacher_prompt_ids") is not None for example in examples):
            microbatches = self.microbatches([teacher_example(example) for example in examples])
        return self.teacher.forward(microbatches, examples)

    # ------------------------------------------------------------------ one step

    def _student_pass(self, microbatches: list[Microbatch], teacher_outputs, forward_only: bool,
                      with_sft: bool, loss=None) -> Optional[list[dict]]:
        loss_function = loss or self.loss

        def microbatch_loss(index: int, batch: Microbatch, hidden: torch.Tensor):
            teacher = teacher_outputs[index] if teacher_outputs is not None else None
            return loss_function(head_input(self.model, hidden), lm_head_weight(self.model), batch.labels,
                                 batch.loss_mask, teacher, with_sft=with_sft)

        return run_microbatches(self.model, microbatches, microbatch_loss, forward_only=forward_only)

    def _reduce(self, outputs: Optional[list[dict]], extra: Optional[dict[str, float]] = None) -> dict[str, float]:
        """Metric sums over microbatches and DP ranks (last stage): every `<name>_sum` of the
        loss is divided by the global token count; `extra` sums are reduced as they are."""
        if outputs is None:
            return {}
        keys = sorted({key for out in outputs for key in out if key.endswith("_sum")})
        extra = extra or {}
        sums = [sum((out[key].double() for out in outputs if key in out), torch.zeros((), dtype=torch.float64))
                for key in keys + ["tokens"]]
        sums += [torch.tensor(float(value), dtype=torch.float64) for value in extra.values()]
        totals = torch.stack(sums).to(self.runtime.device)
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        totals = totals.tolist()
        tokens = totals[len(keys)]
        result = {key[:-len("_sum")]: total / max(tokens, 1) for key, total in zip(keys, totals)}
        result["tokens"] = int(tokens)
        result.update(zip(extra, totals[len(keys) + 1:]))
        return result

    def _gkd_inputs(self, clock: _Stopwatch) -> tuple[list[Microbatch], Optional[list], bool, dict, dict]:
        """GKD / SFT: the step's microbatches, the teacher's output for each, whether the CE
        counts (not on student samples), and sampling sums and metrics."""
        examples = self.local_examples(next(self.data_iterator), self.train_data)
        source: ResponseSource = "dataset"
        if self.samples_responses:
            source = response_source(self.config.lmbda, self.config.seq_kd, self.config.parallel.seed, self.iteration)
        sums: dict[str, float] = {}
        if source != "dataset":
            examples, rollout = self.sample_responses(examples, source)
            sums = {"sampled_tokens": rollout.num_tokens, "samples": len(rollout.completions)}
        self.timings["sampling_s"] = clock.lap()
        microbatches = self.microbatches(examples)
        teacher_outputs = self.teacher_forward(examples, microbatches)
        self.timings["teacher_s"] = clock.lap()
        metrics = {}
        if self.samples_responses:
            metrics = {"on_policy": float(source == "student"), "teacher_sampled": float(source == "teacher")}
        return microbatches, teacher_outputs, source != "student", sums, metrics

    def _opd_rl_inputs(self, clock: _Stopwatch) -> tuple[list[Microbatch], Optional[list], bool, dict, dict]:
        """OPD-RL: a new rollout batch every `num_iterations` steps, reused in between."""
        if self.iteration % self.config.num_iterations == 0:
            self.rollout_batch = build_rollout_batch(self, clock)
            return (self.rollout_batch.microbatches, self.rollout_batch.tokens, False, self.rollout_batch.sums,
                    dict(self.rollout_batch.metrics))
        if self.rollout_batch is None:
            raise RuntimeError(f"iteration {self.iteration} is inside a rollout batch that was never built "
                               f"(num_iterations={self.config.num_iterations})")
        self.timings.update(sampling_s=0.0, teacher_s=0.0)
        clock.lap()
        return self.rollout_batch.microbatches, self.rollout_batch.tokens, False, {}, {}

    def train_step(self) -> dict[str, float]:
        # Every draw of a step is a function of (seed, iteration): resuming needs no RNG state.
        seed_everything(self.config.parallel.seed + 1000 * self.iteration)
        clock = _Stopwatch()
        self.timings = {}
        make_inputs = self._opd_rl_inputs if self.config.algorithm == "opd_rl" else self._gkd_inputs
        microbatches, loss_inputs, with_sft, sums, step_metrics = make_inputs(clock)
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._student_pass(microbatches, loss_inputs, forward_only=False, with_sft=with_sft)
        student_time = clock.lap()
        updated, grad_norm, _ = self.optimizer.step()
        if not updated:
            raise FloatingPointError(f"iteration {self.iteration + 1}: the optimizer skipped the step "
                                     f"(grad norm {grad_norm}): non-finite gradients")
        self.scheduler.step(increment=1)
        optimizer_time = clock.lap()
        self.iteration += 1
        metrics = self._reduce(outputs, sums)
        if metrics:
            metrics.update(step_metrics)
            metrics.update(grad_norm=float(grad_norm), lr=self.optimizer.param_groups[0]["lr"],
                           student_s=student_time, optimizer_s=optimizer_time,
                           tokens_per_s=metrics["tokens"] / max(clock.total, 1e-9))
            if self.teacher is not None:
                metrics["teacher_s"] = self.timings["teacher_s"]
            if self.samples_responses:
                metrics["sampling_s"] = self.timings["sampling_s"]
            if "samples" in metrics:
                metrics["sample_length"] = metrics.pop("sampled_tokens") / max(metrics.pop("samples"), 1)
        return metrics

    @torch.no_grad()
    def evaluate(self, loss=None, sample: bool = False) -> dict[str, float]:
        """The loss per response token (GKD: the divergence; SFT: the CE) over `eval_iters`
        batches of the val data's own responses; `loss`: another loss of the same signature
        (e.g. a forward KL at temperature 1 to report next to a JSD objective, or
        `algorithms.opd_rl.TeacherKL`). `sample`: on the student's own samples for the val
        prompts instead (seeded, the same every call for the same weights)."""
        iterator = DataIterator(self.eval_data, self.config.training.global_batch_size, shuffle=False)
        was_training = self.model.training
        self.model.eval()
        outputs: list = []
        for step in range(self.config.training.eval_iters):
            examples = self.local_examples(next(iterator), self.eval_data)
            if sample:
                examples, _ = self.sample_responses(examples, "student", iteration=-1 - step)
            microbatches = self.microbatches(examples)
            teacher_outputs = self.teacher_forward(examples, microbatches)
            step_outputs = self._student_pass(microbatches, teacher_outputs, forward_only=True,
                                              with_sft=self.config.algorithm == "sft", loss=loss)
            outputs.extend(step_outputs or [])
        self.model.train(was_training)
        return self._reduce(outputs if parallel_state.is_pipeline_last_stage() else None)

    # ------------------------------------------------------------------ the run

    def save(self) -> Path:
        state = {"scheduler": self.scheduler.state_dict(), "data": self.data_iterator.state_dict(),
                 "config": to_dict(self.config)}
        return save_training_checkpoint(self.config.training.output_dir, self.iteration, self.model,
                                        self.optimizer, self._checkpoint_info(), self.student_source.tokenizer_dir,
                                        state)

    def export_hf(self, out: Path) -> None:
        """The student as an HF directory (streamed, one tensor at a time, to rank 0)."""
        with atomic_output_dir(out, force=True) as staging:
            if self.runtime.rank == 0:
                copy_hf_side_files(self.student_source.tokenizer_dir, staging)
            write_hf_weights(self.model, self.student_source.model, staging, self.dtype,
                             label="exporting the student to HF")

    def train(self) -> dict[str, Any]:
        training = self.config.training
        last: dict[str, float] = {}
        while self.iteration < training.train_iters:
            last = self.train_step()
            if last and self.iteration % training.log_interval == 0:
                self.metrics.log(self.iteration, last)
            if self.eval_data is not None and training.eval_interval and self.iteration % training.eval_interval == 0:
                self.metrics.log(self.iteration, self.evaluate(), prefix="eval")
            if training.save_interval and self.iteration % training.save_interval == 0:
                self.save()
        latest = latest_checkpoint(training.output_dir)
        final = latest if latest is not None and latest.name == f"iter_{self.iteration:07d}" else self.save()
        if training.export_hf:
            self.export_hf(Path(training.output_dir) / "hf")
        self.metrics.close()
        return {"iteration": self.iteration, "checkpoint": str(final), **last}
