"""What changed since the checkpoint a run resumes from, and what the resume does about it.

A checkpoint records the config it was trained with and the fingerprints of what it
read (`run_identity`: the student's and teacher's weights, the tokenizer, the data
files). On resume every difference to the new config is one of:

  applied   the new value takes effect, with one line saying so: the length of the run,
            the LR schedule (re-derived from the new values at the checkpoint's step, as
            Megatron-LM's `--override-opt_param-scheduler`), the batch sizes (the data
            position counts rows), logging, evaluation (and its data) and save intervals, the parallel
            layout and optimizer sharding (checkpoints reshard), precision, the compute
            settings, the rollout engine's settings, the teacher server's address and
            client settings. `APPLIED` lists them.
  refused   everything else, which would make the resumed run another run than the one
            checkpointed: the models, the tokenizer, the data and how it is read, the
            algorithm and its parameters, the seeds. The error names each field with both
            values, and how to go on.

`training.resume_allow_changes` lists the fields (or whole sections) whose change the user
means: they are applied with a line too. A field not in `APPLIED` is refused by default,
new fields included, so a resume can only be more careful than it should, never less.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_opd.config.job import JobConfig
from megatron_opd.config.schema import ConfigError, to_dict
from megatron_opd.data.tokenizer_match import tokenizer_fingerprint
from megatron_opd.runtime.fingerprint import path_fingerprint
from megatron_opd.trainer.checkpointing import latest_checkpoint, read_training_state

# Fields (or whole sections) a resume applies; a prefix covers a section.
APPLIED = (
    "training.train_iters", "training.micro_batch_size", "training.max_tokens_per_microbatch",
    "training.pack_sequences",
    "training.precision", "training.save_interval",
    "training.save_total_limit", "training.log_interval", "training.eval_interval", "training.eval_iters",
    "training.tensorboard", "training.export_hf", "training.resume_allow_changes",
    "optimizer.lr", "optimizer.min_lr", "optimizer.lr_warmup_iters", "optimizer.lr_decay_style",
    "optimizer.weight_decay", "optimizer.adam_beta1", "optimizer.adam_beta2", "optimizer.adam_eps",
    "optimizer.clip_grad", "optimizer.use_distributed_optimizer", "training.global_batch_size",
    "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size", "parallel.sequence_parallel",
    "parallel.expert_model_parallel_size", "parallel.expert_tensor_parallel_size",  # experts reshard on load
    "compute", "rollout", "teacher_server", "teacher_model_server", "offload_teacher_model", "data.num_proc",
    "data.val_dataset",  # held-out data: evaluated, never trained on
)
# Fields whose files, not their paths, decide (a path may move, or be spelled another way).
FINGERPRINTED = ("model", "teacher_model", "teacher_cache", "data.dataset", "data.val_dataset")
# The run's tokenizer (data.tokenizer, else the student's) is compared by what it does:
# its vocabulary, special tokens and chat template, whichever directory it is read from.
TOKENIZER = "data.tokenizer"
TEACHER_FILES = "teachers"


def run_identity(config: JobConfig, tokenizer: Any) -> dict[str, Any]:
    """Fingerprints of what the run reads: each path field's files, and the tokenizer's vocabulary."""
    identity: dict[str, Any] = {TOKENIZER: tokenizer_fingerprint(tokenizer)}
    for name, value in _flatten(to_dict(config)).items():
        if name in FINGERPRINTED and value:
            identity[name] = ([path_fingerprint(path) for path in value] if isinstance(value, list)
                              else path_fingerprint(value))
    # `teachers`: each in-process teacher's and cache's files, by name (servers: their address only)
    files = {spec.name: path_fingerprint(spec.model or spec.cache) for spec in config.teachers
             if (spec.model or spec.cache) is not None}
    if files:
        identity[TEACHER_FILES] = files
    return identity


@dataclass(frozen=True)
class Change:
    field: str
    saved: Any
    now: Any
    why: str = ""  # for a fingerprinted field: what differs

    def __str__(self) -> str:
        text = f"{self.field}: {self.saved!r} -> {self.now!r}"
        return f"{text} ({self.why})" if self.why else text


def config_changes(saved_config: dict[str, Any], saved_identity: Optional[dict[str, Any]], config: JobConfig,
                   identity: dict[str, Any]) -> list[Change]:
    """Every difference between the checkpoint's config and fingerprints and the run's. A path
    field whose files are the same (moved, or another spelling of the path) is no change; one
    whose path is the same but whose files differ is. Without saved fingerprints (a checkpoint
    that predates them) only the configs are compared."""
    saved, current = _flatten(saved_config), _flatten(to_dict(config))
    changes = []
    for name in sorted(set(saved) | set(current)):
        before, after = saved.get(name), current.get(name)
        if saved_identity is not None and name in FINGERPRINTED + (TOKENIZER,):
            if saved_identity.get(name) != identity.get(name):
                why = ("another vocabulary, special tokens or chat template" if name == TOKENIZER
                       else "the same path, other contents" if before == after else "other contents")
                changes.append(Change(name, before, after, why))
        elif before != after and name != "training.output_dir":
            changes.append(Change(name, before, after))
    if (saved_identity is not None and saved_identity.get(TEACHER_FILES) != identity.get(TEACHER_FILES)
            and not any(change.field == TEACHER_FILES for change in changes)):
        changes.append(Change(TEACHER_FILES, saved.get(TEACHER_FILES), current.get(TEACHER_FILES),
                              "the same paths, other contents"))
    return changes


def _covered(name: str, prefixes) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


@dataclass(frozen=True)
class ResumePlan:
    """A resume that may go ahead: the checkpoint, and the changes it applies."""

    checkpoint: Path
    applied: list[Change]
    compared_identity: bool  # False: the checkpoint records no fingerprints

    def lines(self) -> list[str]:
        lines = [f"resume: {change} (applied)" for change in self.applied]
        if not self.compared_identity:
            lines.append(f"resume: {self.checkpoint} records no fingerprints (written before they were): "
                         "the weights and data it read are not compared")
        return lines


def plan_resume(config: JobConfig, identity: dict[str, Any]) -> Optional[ResumePlan]:
    """The resume from `training.output_dir`'s latest checkpoint, or None when there is none.
    Raises ConfigError naming every refused change, or when `training.resume` is false and a
    checkpoint is there (a new run would overwrite it)."""
    training = config.training
    path = latest_checkpoint(training.output_dir)
    if path is None:
        return None
    if not training.resume:
        raise ConfigError(f"training.resume=False is invalid: training.output_dir={training.output_dir!r} holds "
                          f"checkpoints up to {path.name}, which a new run would overwrite; set "
                          "training.resume=true to continue that run, or choose another training.output_dir")
    state = read_training_state(path)
    changes = config_changes(state["config"], state.get("identity"), config, identity)
    refused = [change for change in changes
               if not _covered(change.field, APPLIED + tuple(training.resume_allow_changes))]
    if refused:
        names = ",".join(change.field for change in refused)
        raise ConfigError(
            f"resuming from {path} is refused: the run would differ from the checkpointed one in "
            + "; ".join(str(change) for change in refused)
            + f". To resume anyway add training.resume_allow_changes=[{names}]; to start a new run use "
            "another training.output_dir")
    return ResumePlan(path, changes, state.get("identity") is not None)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


__all__ = ["APPLIED", "Change", "ResumePlan", "config_changes", "plan_resume", "run_identity"]
