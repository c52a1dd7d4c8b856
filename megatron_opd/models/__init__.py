"""Megatron-Core GPT models for student and teacher."""

from megatron_opd.models.builder import build_gpt_model, transformer_config
from megatron_opd.models.tp_layout import gather_full_tensors, load_full_state_dict

__all__ = ["build_gpt_model", "gather_full_tensors", "load_full_state_dict", "transformer_config"]
