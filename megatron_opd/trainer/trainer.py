"""The training loop: batch -> responses -> teacher signal -> student forward-backward -> step -> log/save.

One step on every rank (`Trainer.train_step`), whatever the algorithm (`algorithms.base`):
  1. responses: the next global batch's rows, this DP rank's contiguous share, with the
     responses the loss trains on (the dataset's, or the student's / teacher's samples,
     seeded per example); padded and split into microbatches;
  2. teacher signal: the teacher's answer for those microbatches on the last stage
     (hidden states, top-K, or OPD-RL's per-token log-probs and advantages);
  3. the student's forward-backward through Megatron's schedule with the algorithm's
     loss; per-token normalization over the whole global batch (`calculate_per_token_loss`);
  4. Megatron's optimizer step (grad clipping, fp32 master weights) and LR schedule;
  5. metrics each `log_interval`, held-out loss each `eval_interval`, atomic
     dist-checkpoints each `save_interval` and at the end (the newest `save_total_limit` kept).
Resume from the latest checkpoint (what changed since it is applied or refused:
`resume_check`), and a final HF export of the student.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
from megatron.core import parallel_state

from megatron_opd.algorithms import StepContext, build_algorithm
from megatron_opd.algorithms.opsd import check_teacher_prompts
from megatron_opd.checkpoint.hf_weights import write_hf_weights
from megatron_opd.checkpoint.megatron_checkpoint import (
    CheckpointInfo,
    atomic_output_dir,
    copy_hf_side_files,
    dtype_name,
)
from megatron_opd.checkpoint.pretrained import load_pretrained
from megatron_opd.checkpoint.run_models import resolve_models
from megatron_opd.config.checks import check_teacher_paths
from megatron_opd.config.errors import Interrupted
from megatron_opd.config.job import JobConfig
from megatron_opd.config.schema import ConfigError, to_dict
from megatron_opd.data import OUTPUT_COLUMNS, DataIterator, tokenized_split
from megatron_opd.pipeline import eval_mode
from megatron_opd.rollout import RolloutEngine, build_rollout_engine, import_vllm
from megatron_opd.runtime import Runtime, initialize_runtime
from megatron_opd.runtime.distributed import seed_everything
from megatron_opd.runtime.interrupts import deferred_interrupt
from megatron_opd.runtime.precision import resolve_dtype
from megatron_opd.runtime.progress import byte_amount
from megatron_opd.runtime.seeds import step_seed
from megatron_opd.teachers import LocalTeacher
from megatron_opd.teachers.build import remote_teachers, teacher_set
from megatron_opd.teachers.routing import route_dataset
from megatron_opd.trainer.checkpointing import latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from megatron_opd.trainer.metrics import MetricsWriter, reduce_metrics
from megatron_opd.trainer.optim import MIN_LOSS_SCALE, build_optimizer, resolve_distributed_optimizer, wrap_student
from megatron_opd.trainer.resume_check import ResumePlan, plan_resume, run_identity
from megatron_opd.trainer.summary import count_parameters, model_line, start_summary


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
    def __init__(self, config: JobConfig, runtime: Optional[Runtime] = None):
        check_teacher_paths(config)
        if config.rollout.engine == "vllm":
            import_vllm()  # not installed: one line saying how, before anything loads
        self.config = config
        models = resolve_models(config)
        # What the run reads, recorded in each checkpoint; a resume that would change the run
        # is refused here, before any process group or model exists.
        self.identity = run_identity(config, models.tokenizer)
        resume = plan_resume(config, self.identity)
        self.runtime = runtime or initialize_runtime(config.parallel)
        self.dtype = resolve_dtype(config.training.precision, self.runtime.device)
        self.student_source, self.tokenizer, self.vocab_size = models.student, models.tokenizer, models.vocab_size
        self.algorithm = build_algorithm(config, self.vocab_size)
        # A teacher that is not loaded here is checked before the student is: a server that
        # is down or a cache built for other data fails the run in seconds.
        sources = remote_teachers(config, models, self.runtime)

        use_distributed_optimizer = resolve_distributed_optimizer(config.optimizer.use_distributed_optimizer,
                                                                  config.optimizer.optimizer,
                                                                  parallel_state.get_data_parallel_world_size())
        student = load_pretrained(models.student, self.runtime, "student", self.dtype, compute=config.compute,
                                  progress=f"loading the student from {models.student.path}")
        model_lines = [model_line("student", models.student.path, models.student.family,
                                  count_parameters(student), self.dtype)]
        self.model = wrap_student(student, use_distributed_optimizer)
        for name, pretrained in models.teachers.items():  # every in-process teacher, at the student's layout
            label = "teacher" if len(config.teacher_list()) == 1 else f"teacher {name}"
            teacher_model = load_pretrained(pretrained, self.runtime, "teacher", self.dtype, compute=config.compute,
                                            progress=f"loading the {label} from {pretrained.path}")
            model_lines.append(model_line(label, pretrained.path, pretrained.family,
                                          count_parameters(teacher_model), self.dtype))
            sources[name] = LocalTeacher(teacher_model, offload=config.offload_teacher_model)
        self_teacher = LocalTeacher(self.model, is_student=True) if config.teacher == "self" and not sources else None
        # One code path for one teacher or several: the set routes each row to its teacher.
        self.teachers = teacher_set(config, sources, self_teacher)
        # The source of a one-teacher run (seq_kd's sampler, tests), else None
        self.teacher = self.teachers.only() if self.teachers is not None and len(self.teachers) == 1 else None
        self.optimizer, self.scheduler = build_optimizer(
            self.model, dataclasses.replace(config.optimizer, use_distributed_optimizer=use_distributed_optimizer),
            config.training.train_iters)
        # As Megatron-LM's training loop: the schedule multiplies each microbatch's loss by the
        # optimizer's loss scale before backward (fp16's dynamic scale; 1 for bf16 and fp32).
        # Without it fp16 gradients come out divided by the scale (2^16 and more) and no overflow is seen.
        self.model.config.grad_scale_func = self.optimizer.scale_loss
        self.skipped_steps = self.skipped_in_a_row = 0

        self.routes: dict[str, list[int]] = {}  # with several teachers: per split, each row's teacher index
        self.train_data = self._dataset("train")
        self.eval_data = self._dataset("val") if config.data.val_dataset else None
        # OPD-RL: a step's global batch is global_batch_size / num_generations prompts, each sampled G times
        self.data_iterator = DataIterator(self.train_data,
                                          config.training.global_batch_size // self.algorithm.group_size,
                                          seed=config.data.seed, shuffle=config.data.shuffle)
        self.teacher_source = models.teacher
        self.context = StepContext(config, self.runtime, self.model, self.teachers, self.tokenizer, self.vocab_size,
                                   self.student_source.tokenizer_dir, self.train_data, self.data_iterator,
                                   self._rollout_engine, routes=self.routes)
        if self.algorithm.samples:
            self.context.sampling  # a tokenizer without EOS fails now, not at the first sampled step
        self.iteration = 0
        self.resumed_from = None
        if resume is not None:
            self._resume(resume)
        self.metrics = MetricsWriter(config.training.output_dir, enabled=self._is_logging_rank(),
                                     tensorboard=config.training.tensorboard, total_steps=config.training.train_iters,
                                     start_step=self.iteration)
        if self.runtime.rank == 0:
            val_rows = len(self.eval_data) if self.eval_data is not None else None
            for line in start_summary(config, self.runtime, self.dtype, model_lines, len(self.train_data), val_rows,
                                      self.iteration, self.resumed_from):
                print(line, flush=True)

    # ------------------------------------------------------------------ setup

    def _dataset(self, split: str):
        dataset = tokenized_split(self.config.data, self.tokenizer, split, self.runtime)
        # A run that evaluates (eval_interval) needs a full val batch: refused now, not at the first evaluation
        evaluates = split == "train" or self.config.training.eval_interval > 0
        if evaluates and len(dataset) < self.config.training.global_batch_size:
            name = "data.dataset" if split == "train" else "data.val_dataset"
            raise ConfigError(f"training.global_batch_size={self.config.training.global_batch_size} is invalid: "
                              f"{name} has only {len(dataset)} usable rows (a {split} batch needs that many)")
        if self.config.teacher == "self":
            check_teacher_prompts(dataset["teacher_prompt_ids"], split)
        if self.teachers is not None and len(self.teachers) > 1:
            dataset = self._route(dataset, split)
        if self.config.reward_funcs:
            return dataset  # reward functions read the rows' own columns
        return dataset.select_columns(list(OUTPUT_COLUMNS))

    def _route(self, dataset, split: str):
        """Each row's teacher (`teachers.routing.route_dataset`) into `self.routes[split]`."""
        where = "data.dataset" if split == "train" else "data.val_dataset"
        names = self.teachers.names
        dataset, self.routes[split], skipped = route_dataset(dataset, names, self.config, f"{where} (tokenized)")
        if self.runtime.rank == 0:
            if skipped:
                print(f"data ({split}): {skipped} row(s) skipped, their {self.config.teacher_column} names no "
                      f"teacher of this run (known: {list(names)})", flush=True)
            counts = {name: self.routes[split].count(index) for index, name in enumerate(names)}
            print(f"data ({split}): rows per teacher {counts}", flush=True)
        return dataset

    def _rollout_engine(self, source: str) -> RolloutEngine:
        """The engine that samples the student's (or the in-process teacher's) responses."""
        if source == "student":
            model, pretrained = self.model, self.student_source
        elif self.teacher_source is not None:
            model, pretrained = self.teacher.model, self.teacher_source
        else:
            raise ConfigError("seq_kd needs teacher_model (an in-process teacher samples the responses)")
        return build_rollout_engine(self.config.rollout, model, pretrained, self.vocab_size, self.dtype,
                                    self.config.parallel.seed, self.runtime.device, label=source)

    def _is_logging_rank(self) -> bool:
        return (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0)

    def _resume(self, plan: ResumePlan) -> None:
        """Model, optimizer, schedule and data position from the checkpoint, with the changes
        `plan` applies: the LR schedule is the new config's, at the checkpoint's step (the
        scheduler is built with Megatron's override_opt_param_scheduler)."""
        state = load_training_checkpoint(plan.checkpoint, self.model, self.optimizer)
        self.iteration, self.resumed_from = state["iteration"], plan.checkpoint
        self.scheduler.load_state_dict(state["scheduler"])
        lines = plan.lines()
        saved_order = {key: state["data"][key] for key in ("num_samples", "seed", "shuffle")}
        if saved_order == {"num_samples": len(self.train_data), "seed": self.config.data.seed,
                           "shuffle": self.config.data.shuffle}:
            self.data_iterator.load_state_dict(state["data"])
        else:  # another dataset or order (allowed by resume_allow_changes): it starts at its first batch
            lines.append(f"resume: the data order changed ({saved_order} -> {len(self.train_data)} rows, "
                         f"seed {self.config.data.seed}, shuffle {self.config.data.shuffle}): it starts over "
                         "at its first batch")
        if self.runtime.rank == 0:
            for line in lines:
                print(line, flush=True)

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict[str, float]:
        """One optimizer step; its metrics on the logging ranks (last stage), {} elsewhere."""
        # Every draw of a step is a function of (seed, iteration): resuming needs no RNG state.
        seed_everything(step_seed(self.config.parallel.seed, self.iteration))
        clock = _Stopwatch()
        responses = self.algorithm.responses(self.context, self.iteration)
        sampling_time = clock.lap()
        signals = self.algorithm.teacher_signal(self.context, responses)
        teacher_time = clock.lap()

        if not self.model.training:  # train() walks every submodule; eval_mode() restores it after use
            self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self.context.student_pass(responses.microbatches, signals,
                                            self.algorithm.microbatch_loss(responses), forward_only=False,
                                            rollout_logprobs=responses.rollout_logprobs)
        student_time = clock.lap()
        loss_scale = float(self.optimizer.get_loss_scale())
        updated, grad_norm, _ = self.optimizer.step()
        self._check_update(updated, grad_norm, loss_scale)
        if updated:  # a skipped step leaves the weights and the LR schedule as they were (Megatron-LM)
            self.scheduler.step(increment=1)
            self.context.weights_changed()
        optimizer_time = clock.lap()
        self.iteration += 1

        metrics = reduce_metrics(outputs, responses.sums, self.runtime.device)
        if not metrics:
            return metrics
        metrics.update(self.algorithm.step_metrics(responses))
        metrics.update(lr=self.optimizer.param_groups[0]["lr"], student_s=student_time, optimizer_s=optimizer_time,
                       tokens_per_s=metrics["tokens"] / max(clock.total, 1e-9))
        if updated:  # a skipped step has no grad norm
            metrics["grad_norm"] = float(grad_norm)
        if self.dtype == torch.float16:
            metrics.update(loss_scale=loss_scale, skipped=float(not updated), skipped_steps=self.skipped_steps)
        if self.teachers is not None:
            metrics["teacher_s"] = teacher_time
        if self.algorithm.samples:
            metrics["sampling_s"] = sampling_time
        if "samples" in metrics:
            metrics["sample_length"] = metrics.pop("sampled_tokens") / max(metrics.pop("samples"), 1)
        return metrics

    def _check_update(self, updated: bool, grad_norm, loss_scale: float) -> None:
        """Count a step the optimizer skipped; raise FloatingPointError when gradients are non-finite.

        fp16's dynamic loss scaler skips a step whose scaled gradients overflowed and lowers the
        scale; while the scale settles (the first steps of a run) that is routine, and
        Megatron-LM counts such steps and trains on. A skip at the scaler's smallest scale
        (`MIN_LOSS_SCALE`) cannot be cured by scaling: the gradients are non-finite. Without a
        scaler (bf16, fp32) Megatron never skips and applies any gradient, so a non-finite
        grad norm (computed when `optimizer.clip_grad` > 0) is caught here.
        """
        if updated:
            self.skipped_in_a_row = 0
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise FloatingPointError(f"iteration {self.iteration + 1}: grad norm {grad_norm} "
                                         f"(training.precision={self.config.training.precision!r}): "
                                         "non-finite gradients")
            return
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        if loss_scale <= MIN_LOSS_SCALE:
            raise FloatingPointError(
                f"iteration {self.iteration + 1}: the optimizer skipped {self.skipped_in_a_row} step(s) in a "
                f"row, the last at loss scale {loss_scale:g} (the smallest): non-finite gradients")

    @torch.no_grad()
    def evaluate(self, loss=None, sample: bool = False) -> dict[str, float]:
        """The algorithm's held-out loss per response token (GKD: the divergence; SFT: the CE;
        OPD-RL: teacher_kl) over `eval_iters` batches of the val data's own responses; `loss`:
        another loss of the same signature (e.g. a forward KL at temperature 1 next to a JSD
        objective). `sample`: on the student's own samples for the val prompts instead (seeded,
        the same every call for the same weights)."""
        loss = loss or self.algorithm.eval_loss
        iterator = DataIterator(self.eval_data, self.config.training.global_batch_size, shuffle=False)
        context = self.context
        outputs: list = []
        for step in range(self.config.training.eval_iters):
            examples = context.local_examples(next(iterator), self.eval_data, "val")
            if sample:
                examples, _ = context.sample_responses(examples, "student", iteration=-1 - step)
            microbatches = context.microbatches(examples)
            signals = context.teacher_forward(examples, microbatches)
            with eval_mode(self.model):
                outputs.extend(context.student_pass(microbatches, signals, loss, forward_only=True) or [])
        return reduce_metrics(outputs if parallel_state.is_pipeline_last_stage() else None, {}, self.runtime.device)

    # ------------------------------------------------------------------ the run

    def save(self) -> Path:
        started = time.monotonic()
        state = {"scheduler": self.scheduler.state_dict(), "data": self.data_iterator.state_dict(),
                 "config": to_dict(self.config), "identity": self.identity}
        source = self.student_source
        info = CheckpointInfo(model=source.model, family=source.family, dtype=dtype_name(self.dtype),
                              hf_config=source.hf_config)
        # Ctrl-C is held until the checkpoint and `latest` are written: the run then stops with it complete.
        with deferred_interrupt(f"writing checkpoint iter_{self.iteration:07d}"):
            path, removed = save_training_checkpoint(self.config.training.output_dir, self.iteration, self.model,
                                                     self.optimizer, info, source.tokenizer_dir, state,
                                                     keep=self.config.training.save_total_limit)
        if self.runtime.rank == 0:
            size = sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
            gone = f"; removed {', '.join(old.name for old in removed)}" if removed else ""
            print(f"saved checkpoint {path} ({byte_amount(size)}) in {time.monotonic() - started:.1f}s{gone}",
                  flush=True)
        return path

    def export_hf(self, out: Path) -> None:
        """The student as an HF directory (streamed, one tensor at a time, to rank 0)."""
        with deferred_interrupt(f"exporting the student to {out}"), atomic_output_dir(out, force=True) as staging:
            if self.runtime.rank == 0:
                copy_hf_side_files(self.student_source.tokenizer_dir, staging)
            write_hf_weights(self.model, self.student_source.model, staging, self.dtype,
                             label="exporting the student to HF")

    def close(self) -> None:
        """Stop the rollout engines' processes (vLLM); the trainer is unusable afterwards."""
        self.context.close()

    def train(self) -> dict[str, Any]:
        """Steps until `train_iters`, then the final checkpoint and HF export. Ctrl-C raises
        `Interrupted` saying which checkpoint a rerun resumes from (a checkpoint being written
        is finished first; a second Ctrl-C stops at once, and the previous one stays the latest)."""
        try:
            return self._train()
        except KeyboardInterrupt:
            latest = latest_checkpoint(self.config.training.output_dir)
            where = (f"rerun the same command to resume from {latest}" if latest is not None
                     else "no checkpoint was saved yet (training.save_interval)")
            raise Interrupted(f"interrupted during iteration {self.iteration + 1}: {where}") from None

    def _train(self) -> dict[str, Any]:
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
