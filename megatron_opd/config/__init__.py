"""Typed configuration: one schema of dataclasses, validated when loaded."""

from megatron_opd.config.data import DataConfig
from megatron_opd.config.errors import UserError
from megatron_opd.config.model import ModelConfig
from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.config.schema import ConfigError, from_dict, to_dict

__all__ = ["ConfigError", "UserError", "DataConfig", "ModelConfig", "ParallelConfig", "from_dict", "to_dict"]
