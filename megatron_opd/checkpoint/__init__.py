"""HF <-> Megatron-Core checkpoints: weight maps, conversion, loading pretrained models."""

from megatron_opd.checkpoint.hf_weights import export_hf_weights, load_hf_weights
from megatron_opd.checkpoint.megatron_checkpoint import load_model_checkpoint, save_model_checkpoint
from megatron_opd.checkpoint.pretrained import Pretrained, inspect_pretrained, load_pretrained

__all__ = [
    "Pretrained",
    "export_hf_weights",
    "inspect_pretrained",
    "load_hf_weights",
    "load_model_checkpoint",
    "load_pretrained",
    "save_model_checkpoint",
]
