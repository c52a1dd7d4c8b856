"""What the trainer needs from a generation backend: prompts in, sampled completions out.

The trainer only talks to a `RolloutEngine`, so the CPU-capable `MegatronSampler` (the
student's own Megatron model, generating in place) and a GPU engine such as vLLM (which
would sync the student's weights before generating) are interchangeable.

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
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(completion) for completion in self.completions)


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> Rollout:
        """Complete every prompt (token ids). `seeds` (one per prompt) is required unless
        `params.temperature == 0`. Collective over the model's TP and PP groups: every rank
        of them calls it with the same prompts and gets the same result."""
        ...


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
