"""The training config: one schema for every algorithm, loaded from YAML with overrides.

    config = load_job_config("configs/gkd.yaml", ["beta=0.0", "training.train_iters=10"])

Algorithm parameters sit at the top level under ms-swift's names (`beta`, `lmbda`,
`sft_alpha`, `temperature`, `max_completion_length`, `gkd_logits_topk`, `seq_kd`,
`teacher_model`, `teacher_model_server`, `offload_teacher_model`, `teacher_kl_coef`)
and TRL's GRPO names (`num_generations`, `num_iterations`, `epsilon`, `epsilon_high`,
`reward_funcs`) so that a recipe reads the same in both; `teacher_cache` and `teachers`
(several named teachers, rows routed by `teacher_column`) are ours. The
machinery (parallel layout, the models' compute: layer spec and recomputation, data,
optimizer, training schedule, checkpoints, logging, the teacher server's client) is in sections.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

from megatron_opd.config.compute import ComputeConfig
from megatron_opd.config.data import DataConfig
from megatron_opd.config.model import MAKE_VOCAB_SIZE_DIVISIBLE_BY
from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.config.rollout import RolloutConfig
from megatron_opd.config.schema import ConfigError, check, from_dict


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `2e-5` (no dot) as a string; read it as the float everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclass
class OptimizerConfig:
    """Megatron-Core's optimizer and LR schedule (names as in Megatron-LM's arguments)."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clip; 0 disables it
    # Megatron's DistributedOptimizer (fp32 main params and Adam state sharded over DP ranks).
    # null: on for adam at DP > 1 (torch's Adam, TE's or Apex's alike), off at DP=1 and for sgd.
    # Checkpoints load into either optimizer, at any TP/PP/DP (trainer/optimizer_checkpoint.py).
    use_distributed_optimizer: Optional[bool] = None

    def __post_init__(self) -> None:
        check(self.lr > 0, "optimizer.lr", self.lr, "a number > 0")
        check(0 <= self.min_lr <= self.lr, "optimizer.min_lr", self.min_lr, f"in [0, optimizer.lr={self.lr}]")
        check(self.lr_warmup_iters >= 0, "optimizer.lr_warmup_iters", self.lr_warmup_iters, "an integer >= 0")
        check(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "a number >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            check(0 <= getattr(self, name) < 1, f"optimizer.{name}", getattr(self, name), "in [0, 1)")
        check(self.adam_eps > 0, "optimizer.adam_eps", self.adam_eps, "a number > 0")
        check(self.clip_grad >= 0, "optimizer.clip_grad", self.clip_grad, "a number >= 0 (0 disables)")
        check(self.optimizer == "adam" or self.use_distributed_optimizer is not True,
              "optimizer.use_distributed_optimizer",
              self.use_distributed_optimizer,
              f"false with optimizer.optimizer={self.optimizer!r} (Megatron's DistributedOptimizer supports only adam)")


@dataclass
class TrainingConfig:
    """Batch sizes, length of the run, precision, checkpoints and logging."""

    train_iters: int = 1000
    micro_batch_size: int = 1
    global_batch_size: int = 8  # sequences per optimizer step, over all microbatches and DP ranks
    # microbatches by a token budget: a step's rows on a DP rank sorted by length and grouped so
    # that rows x padded length <= this (a longer row alone), each padded to its own longest row;
    # micro_batch_size is then unused for splitting (null: micro_batch_size rows, one shape per step)
    max_tokens_per_microbatch: Optional[int] = None
    # pack several examples into each row (own positions and causal mask: no padding between
    # them), one row of <= max_tokens_per_microbatch input positions per microbatch
    pack_sequences: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    output_dir: str = "outputs/run"
    save_interval: int = 0  # dist-checkpoint every N steps (0: only at the end)
    # keep the newest N checkpoints, deleting older ones once a newer one is complete (null: keep all)
    save_total_limit: Optional[int] = None
    resume: bool = True  # continue from the latest checkpoint in output_dir, if there is one
    # fields (or sections) whose change since the checkpoint a resume may apply although it
    # changes the run (model, data, algorithm parameters ...; trainer/resume_check.py)
    resume_allow_changes: list[str] = field(default_factory=list)
    export_hf: bool = True  # write an HF directory of the final student
    log_interval: int = 1
    eval_interval: int = 0  # held-out divergence every N steps (0: never)
    eval_iters: int = 1
    tensorboard: bool = True

    def __post_init__(self) -> None:
        for name in ("train_iters", "micro_batch_size", "global_batch_size", "log_interval", "eval_iters"):
            check(getattr(self, name) >= 1, f"training.{name}", getattr(self, name), "an integer >= 1")
        for name in ("save_interval", "eval_interval"):
            check(getattr(self, name) >= 0, f"training.{name}", getattr(self, name), "an integer >= 0 (0: off)")
        if self.save_total_limit is not None:
            check(self.save_total_limit >= 1, "training.save_total_limit", self.save_total_limit,
                  "an integer >= 1, or null to keep every checkpoint")
        check(self.global_batch_size % self.micro_batch_size == 0, "training.global_batch_size",
              self.global_batch_size, f"a multiple of training.micro_batch_size={self.micro_batch_size}")
        check(not self.pack_sequences or self.max_tokens_per_microbatch is not None, "training.pack_sequences",
              self.pack_sequences, "false unless training.max_tokens_per_microbatch is set (a packed row's length)")
        if self.max_tokens_per_microbatch is not None:
            check(self.max_tokens_per_microbatch >= 8, "training.max_tokens_per_microbatch",
                  self.max_tokens_per_microbatch, "an integer >= 8 (a row is padded to a multiple of 8 tokens), "
                  "or null (micro_batch_size rows per microbatch)")

    def num_microbatches(self, data_parallel_size: int) -> int:
        per_step = self.micro_batch_size * data_parallel_size
        check(self.global_batch_size % per_step == 0, "training.global_batch_size", self.global_batch_size,
              f"a multiple of micro_batch_size * data-parallel size = {per_step}")
        return self.global_batch_size // per_step


@dataclass
class TeacherServerConfig:
    """How to talk to `teacher_model_server` (vLLM's `vllm serve ... --max-logprobs K`, or
    `megatron-opd serve-teacher`): every failure retries, then stops the run naming the server."""

    timeout_s: float = 120.0  # one request's wall-clock limit (connect + answer)
    max_retries: int = 4  # after the first attempt; on connection errors, timeouts and 5xx
    retry_backoff_s: float = 1.0  # wait before retry i: backoff * 2^i, at most 30 s
    max_concurrency: int = 16  # requests in flight per data-parallel rank
    model_name: Optional[str] = None  # the served model to ask (null: the server's only one)
    verify_tokenizer: bool = True  # at start: the server tokenizes a probe text as our tokenizer does

    def __post_init__(self) -> None:
        check(self.timeout_s > 0, "teacher_server.timeout_s", self.timeout_s, "a number > 0 (seconds)")
        check(self.max_retries >= 0, "teacher_server.max_retries", self.max_retries, "an integer >= 0")
        check(self.retry_backoff_s >= 0, "teacher_server.retry_backoff_s", self.retry_backoff_s, "a number >= 0")
        check(self.max_concurrency >= 1, "teacher_server.max_concurrency", self.max_concurrency, "an integer >= 1")


@dataclass
class TeacherConfig:
    """One named teacher of `teachers`: exactly one source (`model`, `server` or `cache`), and
    its own temperature, top-K and server settings (null: the run's)."""

    name: str  # what rows name in the routing column, and what per-teacher metrics are called
    model: Optional[str] = None  # an HF directory or megatron_opd checkpoint, run in process
    server: Optional[str] = None  # URL of an OpenAI-style server with prompt_logprobs (its settings: teacher_server)
    cache: Optional[str] = None  # a directory written by `megatron-opd cache-teacher` (GKD, lmbda 0)
    temperature: Optional[float] = None  # divides the logits of this teacher's rows (null: the run's temperature)
    gkd_logits_topk: Optional[int] = None  # this teacher's top-K (null: the run's gkd_logits_topk)
    teacher_server: Optional[TeacherServerConfig] = None  # for server (null: the run's teacher_server)

    @property
    def source(self) -> str:
        """'model', 'server' or 'cache': where this teacher's answers come from."""
        return next(kind for kind in ("model", "server", "cache") if getattr(self, kind) is not None)


TEACHER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# The name of the one teacher of teacher_model / teacher_model_server / teacher_cache / teacher: self
SINGLE_TEACHER = "teacher"

ALGORITHMS = ("gkd", "opd_rl", "sft")


@dataclass
class JobConfig:
    model: str  # the student: an HF model directory or a megatron_opd checkpoint
    data: DataConfig
    # gkd: divergence to the teacher as the loss; opd_rl: GRPO with the teacher's log-ratio in the
    # advantage; sft: plain CE on dataset responses, no teacher
    algorithm: Literal["gkd", "opd_rl", "sft"] = "gkd"
    # model: a separate teacher (teacher_model / teacher_model_server). self (OPSD): the student
    # itself fed each row's teacher_prompt; its current weights when teacher_model is null
    # (dynamic), a frozen copy of its initial weights when teacher_model is the student's path (fixed)
    teacher: Literal["model", "self"] = "model"
    teacher_model: Optional[str] = None
    teacher_model_server: Optional[str] = None  # URL of an OpenAI-style server with prompt_logprobs
    # A directory written by `megatron-opd cache-teacher`: the teacher's top-K per response
    # token of the dataset, for off-policy GKD with no teacher loaded
    teacher_cache: Optional[str] = None
    offload_teacher_model: bool = False
    # Several teachers in one run (e.g. math, code and tool-use specialists into one student), each
    # row distilled from the teacher its `teacher_column` names: a list of {name, and one of model
    # (in process, the student's TP/PP layout), server (URL) or cache (directory); optional
    # temperature, gkd_logits_topk and teacher_server, null: the run's}. Empty: the one teacher of
    # teacher_model / teacher_model_server / teacher_cache, which the run treats as a list of one
    teachers: list[TeacherConfig] = field(default_factory=list)
    teacher_column: str = "teacher"  # the data column naming each row's teacher (read with two or more teachers)
    default_teacher: Optional[str] = None  # the teacher of rows whose column is absent or null (null: an error)
    beta: float = 0.5  # 0 forward KL(teacher || student), 1 reverse KL, between: generalized JSD
    lmbda: float = 0.5  # probability that a step trains on student samples (on-policy)
    sft_alpha: float = 0.0  # weight of the CE on dataset responses
    temperature: float = 0.9  # divides both models' logits in the divergence, and sampling
    top_k: Optional[int] = None  # sampling keeps the k most likely tokens (null: all)
    max_completion_length: int = 512  # most tokens sampled per response (EOS ends one earlier)
    gkd_logits_topk: Optional[int] = None  # None: full vocab; K: teacher's top-K, renormalized
    seq_kd: bool = False  # off-policy steps train on teacher samples instead of dataset responses
    opsd_clip: Optional[float] = None  # teacher: self: clip each token's divergence (GKD) or |log-ratio| (OPD-RL)
    # OPD-RL (GRPO): training.global_batch_size counts samples, num_generations per prompt
    num_generations: int = 8
    num_iterations: int = 1  # optimizer steps per rollout batch (GRPO's mu)
    epsilon: float = 0.2  # importance-ratio clip, low bound 1 - epsilon
    epsilon_high: Optional[float] = None  # high bound 1 + epsilon_high (null: epsilon)
    teacher_kl_coef: float = 1.0  # weight of log p_T - log p_S in each token's advantage
    reward_funcs: list[str] = field(default_factory=list)  # module:function, summed; none: pure distillation
    # OPD-RL with rollout.engine: vllm: truncated importance sampling (verl's TIS). Each token's
    # policy loss is weighted by min(p_megatron(y) / p_vllm(y), cap), correcting for the
    # sampler's kernels differing from the trainer's (null: off)
    rollout_importance_sampling_cap: Optional[float] = None
    make_vocab_size_divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY
    teacher_server: TeacherServerConfig = field(default_factory=TeacherServerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        for name in ("beta", "lmbda"):
            check(0.0 <= getattr(self, name) <= 1.0, name, getattr(self, name), "in [0, 1]")
        check(self.sft_alpha >= 0, "sft_alpha", self.sft_alpha, "a number >= 0")
        check(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        check(self.max_completion_length >= 1, "max_completion_length", self.max_completion_length,
              "an integer >= 1")
        if self.top_k is not None:
            check(self.top_k >= 1, "top_k", self.top_k, "an integer >= 1, or null to sample from the whole vocabulary")
        if self.gkd_logits_topk is not None:
            check(self.gkd_logits_topk >= 1, "gkd_logits_topk", self.gkd_logits_topk,
                  "an integer >= 1, or null for the full vocabulary")
        check(self.make_vocab_size_divisible_by >= 1, "make_vocab_size_divisible_by",
              self.make_vocab_size_divisible_by, "an integer >= 1")
        check(self.algorithm in ALGORITHMS, "algorithm", self.algorithm, f"one of {list(ALGORITHMS)}")
        check(self.teacher in ("model", "self"), "teacher", self.teacher, "one of ['model', 'self']")
        if self.algorithm == "sft":
            for name in ("teacher_model", "teacher_model_server", "teacher_cache"):
                check(getattr(self, name) is None, name, getattr(self, name), "null with algorithm: sft (no teacher)")
            check(self.teacher == "model", "teacher", self.teacher, "'model' with algorithm: sft (no teacher)")
            check(not self.seq_kd, "seq_kd", self.seq_kd, "false with algorithm: sft")
        if self.teacher == "self":
            check(self.teacher_model_server is None, "teacher_model_server", self.teacher_model_server,
                  "null with teacher: self (the student is its own teacher)")
            check(not self.seq_kd, "seq_kd", self.seq_kd, "false with teacher: self")
        self._check_remote_teacher()
        if self.teachers:
            self._check_teachers()
        budget, parallel = self.training.max_tokens_per_microbatch, self.parallel
        if budget is not None and parallel.sequence_parallel:
            multiple = 8 * parallel.tensor_model_parallel_size
            check(budget >= multiple, "training.max_tokens_per_microbatch", budget,
                  f"an integer >= {multiple} with parallel.sequence_parallel (rows are padded to a multiple of "
                  f"8 x parallel.tensor_model_parallel_size = {multiple} tokens)")
        expert_ranks = parallel.expert_model_parallel_size * parallel.expert_tensor_size
        # MoE layers gather tokens over the expert group: its data-parallel ranks must run
        # microbatches of one shape, which per-rank token budgets do not give.
        check(budget is None or expert_ranks <= parallel.tensor_model_parallel_size,
              "training.max_tokens_per_microbatch", budget,
              f"null when the experts span data-parallel ranks (parallel.expert_model_parallel_size x "
              f"expert_tensor_parallel_size = {expert_ranks} > tensor_model_parallel_size "
              f"{parallel.tensor_model_parallel_size}); or keep the experts within TP")
        if self.opsd_clip is not None:
            check(self.teacher == "self", "opsd_clip", self.opsd_clip, "null unless teacher: self")
            check(self.opsd_clip > 0, "opsd_clip", self.opsd_clip, "a number > 0, or null (off)")
        check(self.algorithm == "opd_rl" or not self.reward_funcs, "reward_funcs", self.reward_funcs,
              "empty unless algorithm: opd_rl")
        if self.algorithm == "opd_rl":
            self._check_opd_rl()
        if self.rollout.engine == "vllm":
            check(self.temperature <= 2.0, "temperature", self.temperature,
                  "at most 2.0 with rollout.engine: vllm (vLLM samples at temperatures in [0, 2])")
        if self.rollout_importance_sampling_cap is not None:
            check(self.algorithm == "opd_rl" and self.rollout.engine == "vllm", "rollout_importance_sampling_cap",
                  self.rollout_importance_sampling_cap, "null unless algorithm: opd_rl and rollout.engine: vllm "
                  "(the Megatron sampler's log-probs are the trainer's own)")
            check(self.rollout_importance_sampling_cap >= 1, "rollout_importance_sampling_cap",
                  self.rollout_importance_sampling_cap, "a number >= 1 (verl's TIS uses 2), or null (off)")
        known = field_names(JobConfig)
        for index, name in enumerate(self.training.resume_allow_changes):
            check(name in known, f"training.resume_allow_changes[{index}]", name,
                  "a config field or section, e.g. model, data.dataset, beta or optimizer")
        has_teacher = bool(self.teachers) or any(value is not None for value in
                                                 (self.teacher_model, self.teacher_model_server, self.teacher_cache))
        if self.algorithm == "gkd" and not has_teacher and self.teacher != "self":
            raise ConfigError("teacher_model=None is invalid: GKD needs a teacher (an HF dir or megatron_opd "
                              "checkpoint, teacher_model_server or teacher_cache), or teacher: self with a "
                              "teacher_prompt column (OPSD)")

    def _check_remote_teacher(self) -> None:
        """teacher_model_server and teacher_cache: one teacher source, and what each needs."""
        if self.teacher_model_server is not None:
            check(self.teacher_model is None, "teacher_model", self.teacher_model,
                  "null when teacher_model_server is set (one teacher source)")
            check(re.match(r"^https?://[^/\s]+", self.teacher_model_server) is not None, "teacher_model_server",
                  self.teacher_model_server, "an http(s) URL, e.g. http://127.0.0.1:8000")
            if self.algorithm == "gkd":
                check(self.gkd_logits_topk is not None, "gkd_logits_topk", self.gkd_logits_topk,
                      "an integer >= 1 when teacher_model_server is set (the server returns top-K logprobs)")
            check(not self.seq_kd, "seq_kd", self.seq_kd,
                  "false when teacher_model_server is set (teacher samples need the teacher in-process)")
            check(self.algorithm != "opd_rl" or self.temperature == 1.0, "temperature", self.temperature,
                  "1.0 with algorithm: opd_rl and teacher_model_server (servers return log-probs at "
                  "temperature 1, and a sampled token's tempered log-prob needs the whole vocab)")
        check(not self.offload_teacher_model or self.teacher_model is not None or bool(self.teachers),
              "offload_teacher_model",
              self.offload_teacher_model, "false unless teacher_model is set (only an in-process teacher has weights)")
        if self.teacher_cache is not None:
            for name in ("teacher_model", "teacher_model_server"):
                check(getattr(self, name) is None, name, getattr(self, name),
                      "null when teacher_cache is set (one teacher source)")
            check(self.algorithm == "gkd", "algorithm", self.algorithm, "'gkd' with teacher_cache")
            check(self.teacher == "model", "teacher", self.teacher, "'model' with teacher_cache")
            check(self.lmbda == 0.0 and not self.seq_kd, "lmbda", self.lmbda,
                  "0 with teacher_cache and seq_kd false (the cache holds the dataset's responses only)")
            check(self.gkd_logits_topk is not None, "gkd_logits_topk", self.gkd_logits_topk,
                  "an integer >= 1 when teacher_cache is set (at most the cache's K)")

    def _check_teachers(self) -> None:
        """`teachers`: unique names, one source each, settings that fit the algorithm, a known default."""
        for name in ("teacher_model", "teacher_model_server", "teacher_cache"):
            check(getattr(self, name) is None, name, getattr(self, name),
                  "null when teachers is set (list every teacher there)")
        check(self.teacher == "model", "teacher", self.teacher, "'model' when teachers is set")
        check(self.algorithm != "sft", "teachers", [spec.name for spec in self.teachers],
              "empty with algorithm: sft (no teacher)")
        names = []
        for index, spec in enumerate(self.teachers):
            where = f"teachers[{index}]"
            check(TEACHER_NAME.match(spec.name) is not None, f"{where}.name", spec.name,
                  "a non-empty name of letters, digits, '_', '.' or '-' (metrics are named after it)")
            check(spec.name not in names, f"{where}.name", spec.name, f"a name not used before (taken: {names})")
            names.append(spec.name)
            sources = [kind for kind in ("model", "server", "cache") if getattr(spec, kind) is not None]
            check(len(sources) == 1, where, spec.name,
                  f"exactly one source: set one of {where}.model, {where}.server or {where}.cache"
                  + (f" (it sets {sources})" if sources else " (it sets none)"))
            temperature = self.temperature if spec.temperature is None else spec.temperature
            topk = self.gkd_logits_topk if spec.gkd_logits_topk is None else spec.gkd_logits_topk
            if spec.temperature is not None:
                check(spec.temperature > 0, f"{where}.temperature", spec.temperature, "a number > 0, or null")
            if spec.gkd_logits_topk is not None:
                check(spec.gkd_logits_topk >= 1, f"{where}.gkd_logits_topk", spec.gkd_logits_topk,
                      "an integer >= 1, or null (the run's gkd_logits_topk)")
            check(spec.teacher_server is None or spec.server is not None, f"{where}.teacher_server",
                  spec.teacher_server, f"null unless {where}.server is set")
            if spec.server is not None:
                check(re.match(r"^https?://[^/\s]+", spec.server) is not None, f"{where}.server", spec.server,
                      "an http(s) URL, e.g. http://127.0.0.1:8000")
                if self.algorithm == "gkd":
                    check(topk is not None, f"{where}.gkd_logits_topk", spec.gkd_logits_topk,
                          "an integer >= 1 for a server teacher (here or gkd_logits_topk; servers return top-K)")
                check(self.algorithm != "opd_rl" or temperature == 1.0, f"{where}.temperature", temperature,
                      "1.0 for a server teacher with algorithm: opd_rl (servers return log-probs at temperature 1)")
            if spec.cache is not None:
                check(self.algorithm == "gkd" and self.lmbda == 0.0 and not self.seq_kd, f"{where}.cache", spec.cache,
                      "null unless algorithm: gkd with lmbda 0 and seq_kd false (the cache holds the dataset's "
                      "responses only)")
                check(topk is not None, f"{where}.gkd_logits_topk", spec.gkd_logits_topk,
                      "an integer >= 1 for a cache teacher (here or gkd_logits_topk; at most the cache's K)")
        check(not self.seq_kd or len(self.teachers) == 1 and self.teachers[0].model is not None, "seq_kd",
              self.seq_kd, "false with several teachers (teacher samples need one in-process teacher)")
        check(not self.offload_teacher_model or any(spec.model is not None for spec in self.teachers),
              "offload_teacher_model", self.offload_teacher_model,
              "false unless a teacher has a model (only an in-process teacher has weights)")
        check(self.teacher_column != "" and not self.teacher_column.startswith("_"), "teacher_column",
              self.teacher_column, "a data column name (not empty, not starting with '_')")
        if self.default_teacher is not None:
            check(self.default_teacher in names, "default_teacher", self.default_teacher,
                  f"one of the teachers' names {names}, or null")

    def teacher_list(self) -> list[TeacherConfig]:
        """The run's separate teachers, one list whatever the config spelled: `teachers`, or the
        single-teacher fields as a list of one named 'teacher' (the run's temperature and top-K;
        teacher: self with teacher_model is the student's frozen initial copy); empty without a
        separate teacher (teacher: self dynamic, sft, reward-only OPD-RL)."""
        if self.teachers:
            return list(self.teachers)
        if self.algorithm == "sft":
            return []
        if all(value is None for value in (self.teacher_model, self.teacher_model_server, self.teacher_cache)):
            return []
        return [TeacherConfig(name=SINGLE_TEACHER, model=self.teacher_model, server=self.teacher_model_server,
                              cache=self.teacher_cache)]

    def teacher_temperature(self, spec: TeacherConfig) -> float:
        return self.temperature if spec.temperature is None else spec.temperature

    def teacher_topk(self, spec: TeacherConfig) -> Optional[int]:
        return self.gkd_logits_topk if spec.gkd_logits_topk is None else spec.gkd_logits_topk

    def teacher_server_settings(self, spec: TeacherConfig) -> TeacherServerConfig:
        return self.teacher_server if spec.teacher_server is None else spec.teacher_server

    def _check_opd_rl(self) -> None:
        check(self.num_generations >= 2, "num_generations", self.num_generations,
              "an integer >= 2 (group-normalized advantages need a group)")
        check(self.num_iterations >= 1, "num_iterations", self.num_iterations, "an integer >= 1")
        check(self.epsilon > 0, "epsilon", self.epsilon, "a number > 0")
        if self.epsilon_high is not None:
            check(self.epsilon_high > 0, "epsilon_high", self.epsilon_high, "a number > 0, or null (= epsilon)")
        check(not self.seq_kd, "seq_kd", self.seq_kd, "false with algorithm: opd_rl (it trains on student samples)")
        has_teacher = (self.teacher == "self" or self.teacher_model is not None or self.teacher_model_server is not None
                       or bool(self.teachers))
        check(has_teacher or bool(self.reward_funcs), "reward_funcs", self.reward_funcs,
              "at least one module:function when algorithm: opd_rl has no teacher (nothing to learn from)")
        training = self.training
        check(training.global_batch_size % self.num_generations == 0, "training.global_batch_size",
              training.global_batch_size, f"a multiple of num_generations={self.num_generations}")
        # A checkpoint inside a rollout batch could not be resumed exactly (its samples and
        # old log-probabilities came from weights the checkpoint no longer has).
        for name in ("train_iters", "save_interval"):
            check(getattr(training, name) % self.num_iterations == 0, f"training.{name}", getattr(training, name),
                  f"a multiple of num_iterations={self.num_iterations} (checkpoints fall between rollout batches)")
        check(training.eval_interval == 0, "training.eval_interval", training.eval_interval,
              "0 with algorithm: opd_rl (no held-out loss; measure generations instead, as the demo does)")

    def check_world(self, world_size: int) -> int:
        """The data-parallel size for `world_size` ranks; raises when the layout does not fit."""
        data_parallel = self.parallel.data_parallel_size(world_size)
        self.training.num_microbatches(data_parallel)
        return data_parallel


def field_names(cls: type, prefix: str = "") -> set[str]:
    """Every dotted field and section name of a config dataclass (`training`, `training.lr` ...)."""
    names = set()
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        name = prefix + item.name
        names.add(name)
        if dataclasses.is_dataclass(hints[item.name]):
            names |= field_names(hints[item.name], name + ".")
    return names


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is invalid: write key=value, e.g. training.train_iters=10")
    key, value = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r} is invalid: empty key in {key!r}")
    try:
        return path, _load_yaml(value) if value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {error}") from error


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`raw` with each `a.b.c=value` set; values are parsed as YAML (`0.5`, `true`, `[a, b]`)."""
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[:depth + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_raw_config(path: Optional[Path | str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The YAML at `path` (or an empty mapping) with the overrides applied, not yet typed or checked."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            raw = _load_yaml(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {type(raw).__name__}")
    return apply_overrides(raw, overrides)


def load_job_config(path: Optional[Path | str], overrides: Sequence[str] = (),
                      world_size: Optional[int] = None) -> JobConfig:
    """Read YAML at `path` (or start empty), apply overrides, build and validate the config.

    With `world_size` (default: $WORLD_SIZE when set) the layout is checked against it too.
    """
    config = from_dict(JobConfig, read_raw_config(path, overrides))
    if world_size is None and "WORLD_SIZE" in os.environ:
        world_size = int(os.environ["WORLD_SIZE"])
    if world_size is not None:
        config.check_world(world_size)
    return config
