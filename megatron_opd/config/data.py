"""Training data: which files, which tokenizer, how rows become token sequences.

Field names and truncation strategies follow ms-swift (`dataset`, `val_dataset`,
`max_length`, `truncation_strategy`) so a recipe reads the same in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_opd.config.schema import check, is_int

TRUNCATION_STRATEGIES = ("right", "left", "delete")
PROMPT_FORMATS = ("chat", "raw")


@dataclass
class DataConfig:
    """Where the rows come from and how they are tokenized (see `megatron_opd.data`).

    `dataset` / `val_dataset`: JSONL, JSON or parquet files, or directories written by
    `datasets.Dataset.save_to_disk`; several are concatenated in the order given.

    `max_length` bounds prompt + response tokens (and teacher prompt + response, for
    rows with a `teacher_prompt`). A longer row is cut by `truncation_strategy`:
    "right" cuts the end of the response, "left" cuts the start of the prompt (keeping
    at least one prompt token; only when the response alone does not fit is its end
    cut too), "delete" drops the row and counts it.

    `prompt_format` applies to `prompt` + `completion` rows whose values are strings:
    "chat" renders them as one user and one assistant message with the tokenizer's chat
    template, "raw" concatenates prompt tokens + completion tokens + EOS. Rows given as
    messages always go through the chat template.

    `allow_prompt_only` keeps rows that have no response (messages without an assistant
    turn, `prompt` without `completion`), as OPSD / pure on-policy datasets have; they
    get an all-zero loss mask and are usable only where the trainer samples responses.
    Without it such rows are malformed.

    `shuffle` and `seed` drive the sampler (`DataIterator`), not the tokenized dataset,
    which keeps file order.
    """

    dataset: list[str]
    val_dataset: list[str] = field(default_factory=list)
    tokenizer: Optional[str] = None  # HF tokenizer directory; None: the student model's
    max_length: int = 2048
    truncation_strategy: Literal["right", "left", "delete"] = "right"
    prompt_format: Literal["chat", "raw"] = "chat"
    allow_prompt_only: bool = False
    skip_bad_rows: bool = False  # True: drop malformed rows and count them instead of raising
    shuffle: bool = True
    seed: int = 42
    num_proc: int = 1  # processes for tokenization (datasets.map)

    def __post_init__(self) -> None:
        # from_dict has checked types already; these repeat the checks for direct construction.
        check(isinstance(self.dataset, (list, tuple)) and len(self.dataset) > 0, "data.dataset",
              self.dataset, "a non-empty list of paths (.jsonl, .json, .parquet or save_to_disk directories)")
        for name in ("dataset", "val_dataset"):
            values = getattr(self, name)
            check(isinstance(values, (list, tuple)), f"data.{name}", values, "a list of paths")
            for i, path in enumerate(values):
                check(isinstance(path, str) and path != "", f"data.{name}[{i}]", path, "a non-empty path")
        if self.tokenizer is not None:
            check(isinstance(self.tokenizer, str) and self.tokenizer != "", "data.tokenizer",
                  self.tokenizer, "a tokenizer directory, or null for the student model's")
        check(is_int(self.max_length) and self.max_length >= 2, "data.max_length", self.max_length,
              "an integer >= 2 (at least one prompt and one response token)")
        check(self.truncation_strategy in TRUNCATION_STRATEGIES, "data.truncation_strategy",
              self.truncation_strategy, f"one of {list(TRUNCATION_STRATEGIES)}")
        check(self.prompt_format in PROMPT_FORMATS, "data.prompt_format", self.prompt_format,
              f"one of {list(PROMPT_FORMATS)}")
        for name in ("allow_prompt_only", "skip_bad_rows", "shuffle"):
            check(isinstance(getattr(self, name), bool), f"data.{name}", getattr(self, name), "true or false")
        check(is_int(self.seed) and self.seed >= 0, "data.seed", self.seed, "an integer >= 0")
        check(is_int(self.num_proc) and self.num_proc >= 1, "data.num_proc", self.num_proc, "an integer >= 1")



__all__ = ["DataConfig", "PROMPT_FORMATS", "TRUNCATION_STRATEGIES"]
