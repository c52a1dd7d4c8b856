"""What the trainer needs from a generation backend: prompts in, sampled completions out.

The trainer only talks to a `RolloutEngine`, so `MegatronSampler` (the student's own
Megatron model, generating in place) and `VLLMEngine` (a vLLM engine holding a copy of
the weights, re-synced after every optimizer step) are interchangeable.

Sampling is seeded per prompt: row i of a batch draws its noise from its own stream,
seeded by `seeds[i]`, so a completion depends on (weights, prompt, seed) only, not on
which other prompts share its batch, the data-parallel split or the TP size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence

from megatron_opd.config.schema import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature=0` is greedy; `top_k` keeps the k most likely tokens;
    a completion ends at the first id in `eos_token_ids` (kept) or after `max_new_tokens`."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} is invalid: must be an integer >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r} is invalid: must be >= 0 (0 is greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} is invalid: must be null or an integer >= 1")


@dataclass
class Rollout:
    """Completions of one `generate` call, in prompt order."""

    completions: list[list[int]]  # sampled ids, including the EOS that ended a completion
    finished: list[bool]  # True: ended on an EOS id; False: cut at max_new_tokens
    seconds: float = 0.0
    forward_passes: int = 0
    # The engine's own log-prob of each sampled id (of the distribution it sampled from),
    # where it differs from the trainer's (vLLM); None: the trainer's own model sampled
    logprobs: Optional[list[list[float]]] = None
    extra: dict = field(default_factory=dict)  # engine statistics, e.g. weight_sync_s

    @property
    def num_tokens(self) -> int:
        return sum(len(completion) for completion in self.completions)


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> Rollout:
        """Complete every prompt (token ids). `seeds` (one per prompt) is required unless
        `params.temperature == 0`. Collective: every rank of a model-parallel group calls it
        with the same prompts and gets the same result (an engine that syncs weights first
        needs every rank of the world)."""
        ...

    def weights_changed(self) -> None:
        """The model's weights changed (an optimizer step): an engine holding a copy re-syncs
        before its next `generate`."""
        ...

    def close(self) -> None:
        ...


def check_request(prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Optional[Sequence[int]],
                  vocab_size: int) -> list[int]:
    """The prompts' lengths; raises ValueError for a request no engine can serve."""
    if len(prompts) == 0:
        raise ValueError("generate needs at least one prompt")
    lengths = [len(prompt) for prompt in prompts]
    if min(lengths) < 1:
        raise ValueError(f"prompt {lengths.index(0)} is empty: every prompt needs at least one token")
    for row, prompt in enumerate(prompts):
        bad = [token for token in prompt if not 0 <= int(token) < vocab_size]
        if bad:
            raise ValueError(f"prompt {row} has token ids outside [0, {vocab_size}): {bad[:5]}")
    if params.top_k is not None and params.top_k > vocab_size:
        raise ValueError(f"top_k={params.top_k} is invalid: larger than the vocab ({vocab_size})")
    if params.temperature > 0:
        if seeds is None or len(seeds) != len(prompts):
            raise ValueError(f"sampling at temperature {params.temperature} needs one seed per prompt "
                             f"({len(prompts)}), got {None if seeds is None else len(seeds)}")
    return lengths


def eos_token_ids(tokenizer, model_dir: Path) -> tuple[int, ...]:
    """Ids that end a sampled response: the tokenizer's EOS and the model's
    `generation_config.json` ones (instruct models stop on e.g. Qwen's <|im_end|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    generation_config = Path(model_dir) / "generation_config.json"
    if generation_config.is_file():
        value = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if not ids:
        raise ConfigError(f"the tokenizer of {model_dir} has no EOS token and no generation_config.json "
                          "eos_token_id: sampled responses (lmbda > 0 or seq_kd) could not end")
    return tuple(sorted(int(i) for i in ids))
