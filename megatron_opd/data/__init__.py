"""The data pipeline: rows from JSONL / JSON / parquet / save_to_disk files, tokenized
with a loss mask on response tokens (`build_dataset`), a resumable seeded batch order
(`DataIterator`) and padding into Megatron's [b, s + 1] token layout (`collate`)."""

from megatron_opd.data.build import OUTPUT_COLUMNS, DataStats, build_dataset, check_tokenizer, tokenized_split
from megatron_opd.data.collate import collate, pad_token_id, teacher_example
from megatron_opd.data.errors import DataError, DataFileError, MissingDataFileError, TemplateError
from megatron_opd.data.loading import load_rows
from megatron_opd.data.sampler import DataIterator, local_batch

__all__ = ["DataError", "DataFileError", "DataIterator", "DataStats", "MissingDataFileError", "OUTPUT_COLUMNS",
           "TemplateError", "build_dataset", "check_tokenizer", "collate", "load_rows", "local_batch",
           "pad_token_id", "teacher_example", "tokenized_split"]
