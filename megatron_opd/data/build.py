"""From `DataConfig` to a tokenized `datasets.Dataset`: load each file, tokenize it with
`datasets.map`, drop and count bad rows, concatenate the files in order.

Each row of the result keeps its original columns (reward functions read them) and
gains:

    input_ids          list[int]   prompt + response, at most data.max_length
    loss_mask          list[int]   same length; 1 on response tokens to predict
    prompt_length      int         ids before the first response token
    teacher_prompt_ids list[int] | None   the teacher's prompt (OPSD), else None

Files are tokenized one by one so that an error can name the file and row. The map's
cache key is computed here (source fingerprint, the config fields that shape the
output, the tokenizer's vocabulary / template, a format version) rather than by
datasets hashing the function, which would pickle the whole tokenizer and, for some
tokenizers, give a different hash each run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import datasets
import transformers
from datasets.fingerprint import Hasher

from megatron_opd.config.data import DataConfig
from megatron_opd.config.schema import fail
from megatron_opd.data.encode import encode_row
from megatron_opd.data.errors import DataError, DataFileError, RowProblem, TemplateError
from megatron_opd.data.loading import load_rows
from megatron_opd.data.truncation import truncate
from megatron_opd.runtime.distributed import Runtime

OUTPUT_COLUMNS = ("input_ids", "loss_mask", "prompt_length", "teacher_prompt_ids")
_SKIP, _DETAIL, _TRUNCATED = "_skip_reason", "_skip_detail", "_truncated"
_FORMAT_VERSION = 1  # bump when the encoding rules change, so cached maps are not reused
_MAX_EXAMPLES = 10


@dataclass
class DataStats:
    """What loading did: rows read, kept, truncated, and skipped per reason (the reason
    codes of `megatron_opd.data.errors`), with the first few skipped rows spelled out."""

    rows_read: int = 0
    rows_kept: int = 0
    rows_truncated: int = 0
    rows_skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return sum(self.rows_skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.rows_skipped.items()))
        return (f"{self.rows_read} rows read, {self.rows_kept} kept, {self.rows_truncated} truncated, "
                f"{self.skipped} skipped" + (f" ({reasons})" if reasons else ""))


def build_dataset(config: DataConfig, tokenizer: Any, split: str = "train",
                  cache_dir: Optional[str] = None) -> tuple[datasets.Dataset, DataStats]:
    """The tokenized rows of `config.dataset` (split "train") or `config.val_dataset` ("val").

    `cache_dir`: where datasets converts JSON / parquet and writes the tokenized Arrow
    files (datasets' defaults when None: its home cache, and beside the arrow files of a
    save_to_disk directory). A second call with the same inputs reuses them.
    Raises DataError for a malformed row (unless `config.skip_bad_rows`), DataFileError
    for a file that cannot be used as a whole (unreadable, not UTF-8, no rows, no
    'messages' / 'prompt' column) or when no row is left, TemplateError for a chat template
    whose assistant turns cannot be located, ConfigError for a tokenizer that cannot
    render the configured format: all UserErrors, printed as one line by the commands.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} is invalid: 'train' or 'val'")
    field_name = "data.dataset" if split == "train" else "data.val_dataset"
    paths = list(config.dataset if split == "train" else config.val_dataset)
    if not paths:
        raise ValueError(f"{field_name} is empty: no {split} data to build")
    check_tokenizer(config, tokenizer)
    stats = DataStats()
    parts = [_tokenize_file(load_rows(path, cache_dir), path, config, tokenizer, cache_dir, stats)
             for path in paths]
    dataset = _concatenate(parts, paths)
    if len(dataset) == 0:
        example = f"; first: {stats.skipped_examples[0]}" if stats.skipped_examples else ""
        raise DataFileError(", ".join(paths), f"no usable rows in {field_name}: {stats.summary()}{example}; fix "
                                              "these rows, or change the settings that drop them "
                                              "(data.truncation_strategy, data.max_length, data.allow_prompt_only)")
    return dataset, stats


def check_tokenizer(config: DataConfig, tokenizer: Any) -> None:
    """Refuse a tokenizer that cannot render `config.prompt_format` before reading any data."""
    if config.prompt_format == "chat" and getattr(tokenizer, "chat_template", None) is None:
        fail("data.prompt_format", "chat", f"'raw', or a tokenizer with a chat template "
             f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has none)")
    if config.prompt_format == "raw" and tokenizer.eos_token_id is None:
        fail("data.prompt_format", "raw", "'chat', or a tokenizer with an eos_token (raw rows end with EOS)")


def _check_columns(rows: datasets.Dataset, path: str) -> None:
    """Refuse a file none of whose rows can be used (whatever data.skip_bad_rows says: it
    would skip every row), naming the columns it has and those it needs."""
    if not {"messages", "prompt"} & set(rows.column_names):
        raise DataFileError(path, f"no usable rows: its columns are {rows.column_names}, but each row needs "
                                  "'messages' (a list of {role, content} messages) or 'prompt' and 'completion'; "
                                  "rename the columns (data.skip_bad_rows would skip every row)")
    taken = sorted(set(rows.column_names) & set(OUTPUT_COLUMNS + (_SKIP, _DETAIL, _TRUNCATED)))
    if taken:
        raise DataFileError(path, f"has column(s) {taken}, which tokenization writes; rename or drop them")


def _tokenize_file(rows: datasets.Dataset, path: str, config: DataConfig, tokenizer: Any,
                   cache_dir: Optional[str], stats: DataStats) -> datasets.Dataset:
    _check_columns(rows, path)
    features = rows.features.copy()
    features.update({
        "input_ids": datasets.List(datasets.Value("int32")),
        "loss_mask": datasets.List(datasets.Value("int8")),
        "prompt_length": datasets.Value("int32"),
        "teacher_prompt_ids": datasets.List(datasets.Value("int32")),
        _SKIP: datasets.Value("string"),
        _DETAIL: datasets.Value("string"),
        _TRUNCATED: datasets.Value("bool"),
    })
    options = dict(prompt_format=config.prompt_format, allow_prompt_only=config.allow_prompt_only,
                   max_length=config.max_length, truncation_strategy=config.truncation_strategy,
                   skip_bad_rows=config.skip_bad_rows)
    fingerprint = Hasher.hash([rows._fingerprint, _FORMAT_VERSION, transformers.__version__, options,
                               _tokenizer_key(tokenizer)])
    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs["cache_file_name"] = str(Path(cache_dir) / f"tokenized-{fingerprint}.arrow")
    tokenized = rows.map(functools.partial(_encode_example, file=path, tokenizer=tokenizer, **options),
                         with_indices=True, features=features, new_fingerprint=fingerprint,
                         num_proc=config.num_proc if config.num_proc > 1 else None,
                         desc=f"Tokenizing {path}", **kwargs)
    reasons, details, truncated = (list(tokenized[name]) for name in (_SKIP, _DETAIL, _TRUNCATED))
    kept = [index for index, reason in enumerate(reasons) if not reason]
    for index, reason in enumerate(reasons):
        if reason:
            stats.rows_skipped[reason] = stats.rows_skipped.get(reason, 0) + 1
            if len(stats.skipped_examples) < _MAX_EXAMPLES:
                stats.skipped_examples.append(f"{path} row {index}: {details[index]} [{reason}]")
    stats.rows_read += len(reasons)
    stats.rows_kept += len(kept)
    stats.rows_truncated += sum(truncated)
    if len(kept) < len(tokenized):
        tokenized = tokenized.select(kept)  # an in-memory indices mapping; nothing is rewritten
    return tokenized.remove_columns([_SKIP, _DETAIL, _TRUNCATED])


def _encode_example(row: Mapping[str, Any], index: int, *, file: str, tokenizer: Any, prompt_format: str,
                    allow_prompt_only: bool, max_length: int, truncation_strategy: str,
                    skip_bad_rows: bool) -> dict[str, Any]:
    """The map function: the new columns of one row (module-level so that it pickles)."""
    try:
        encoded = encode_row(row, tokenizer, prompt_format, allow_prompt_only)
        encoded, truncated = truncate(encoded, max_length, truncation_strategy)
    except RowProblem as problem:
        if not (skip_bad_rows or problem.always_skip):
            raise DataError(file, index, problem.reason, problem.detail) from None
        return {"input_ids": [], "loss_mask": [], "prompt_length": 0, "teacher_prompt_ids": None,
                _SKIP: problem.reason, _DETAIL: problem.detail, _TRUNCATED: False}
    except TemplateError as error:
        raise TemplateError(f"{file} row {index}: {error}") from None
    return {"input_ids": encoded.input_ids, "loss_mask": encoded.loss_mask,
            "prompt_length": encoded.prompt_length, "teacher_prompt_ids": encoded.teacher_prompt_ids,
            _SKIP: "", _DETAIL: "", _TRUNCATED: truncated}


def _tokenizer_key(tokenizer: Any) -> Any:
    """What of the tokenizer shapes the ids: vocabulary and rules, template, special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id,
            backend.to_str() if backend is not None else Hasher.hash(tokenizer)]


def _concatenate(parts: list[datasets.Dataset], paths: list[str]) -> datasets.Dataset:
    """Concatenate files whose passthrough columns may differ: a column missing from a file
    is added there as None; one whose type differs between files (e.g. messages with an
    extra key in one file) is stored as JSON in all, keeping every value."""
    if len(parts) == 1:
        return parts[0]
    columns: list[str] = []
    types: dict[str, dict[str, Any]] = {}
    for part in parts:
        for name, feature in part.features.items():
            if name not in types:
                columns.append(name)
                types[name] = {}
            if feature != datasets.Value("null"):
                types[name][repr(feature)] = feature
    conflicting = {name for name, kinds in types.items() if len(kinds) > 1}
    aligned = []
    for part, path in zip(parts, paths):
        for name in columns:
            if name in conflicting and name in part.column_names:
                try:
                    part = part.cast_column(name, datasets.Json())
                except Exception as error:
                    raise DataFileError(path, f"column {name!r} has different types across data files "
                                              f"({', '.join(types[name])}) and this file's cannot be stored as "
                                              f"JSON ({error}); give the column one type in every file, or "
                                              "rename it in one") from error
            elif name not in part.column_names:
                feature = datasets.Json() if name in conflicting else next(iter(types[name].values()),
                                                                            datasets.Value("null"))
                part = part.add_column(name, [None] * len(part), feature=feature)
        aligned.append(part.select_columns(columns))
    return datasets.concatenate_datasets(aligned)




def tokenized_split(config: DataConfig, tokenizer, split: str, runtime: Runtime) -> datasets.Dataset:
    """`build_dataset` on every rank: each node's local rank 0 tokenizes first (filling the
    datasets cache, node-local or shared), the other ranks then read it, instead of every
    rank tokenizing the same files at once. The wait is on `runtime.host_wait_group` (gloo,
    hours), not on the training backend's group, whose timeout a large dataset would pass."""
    import torch.distributed as dist

    tokenizes_first = runtime.local_rank == 0
    if not tokenizes_first:
        dist.barrier(group=runtime.host_wait_group)
    dataset, stats = build_dataset(config, tokenizer, split)
    if tokenizes_first:
        if runtime.rank == 0:
            print(f"data ({split}): {stats.summary()}", flush=True)
        dist.barrier(group=runtime.host_wait_group)
    return dataset


__all__ = ["DataStats", "OUTPUT_COLUMNS", "build_dataset", "check_tokenizer", "tokenized_split"]
