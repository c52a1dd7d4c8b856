"""How the models compute: layer implementation, attention kernel, activation recomputation.

Names and meanings are Megatron-LM's (`--transformer-impl`, `--attention-backend`,
`--recompute-granularity`, `--recompute-method`, `--recompute-num-layers`,
`--recompute-modules`), checked here so that a bad combination names our field instead
of failing inside Megatron's TransformerConfig. Recomputation applies to the student
only: the teacher runs forward-only, without activations to save.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_opd.config.schema import check

TransformerImpl = Literal["auto", "transformer_engine", "local"]
# Megatron-Core's recompute_modules that exist in a dense model (the MoE and MLA ones need those layers).
DENSE_RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")


@dataclass
class ComputeConfig:
    # auto: Transformer Engine on CUDA, Megatron's local modules on CPU
    transformer_impl: TransformerImpl = "auto"
    # Transformer Engine's attention kernel (auto lets TE choose: flash, then fused, then unfused)
    attention_backend: Literal["auto", "flash", "fused", "unfused"] = "auto"
    # null: keep every activation. full: recompute whole layers (recompute_method, recompute_num_layers);
    # selective: recompute only recompute_modules inside each layer
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    recompute_method: Optional[Literal["uniform", "block"]] = None
    # full + uniform: layers per recomputed chunk; full + block: layers recomputed per pipeline stage
    recompute_num_layers: Optional[int] = None
    recompute_modules: Optional[list[str]] = None  # selective only; null: [core_attn]

    def __post_init__(self) -> None:
        check(self.attention_backend == "auto" or self.transformer_impl != "local", "compute.attention_backend",
              self.attention_backend, "'auto' with compute.transformer_impl: local (the backends are "
              "Transformer Engine's kernels)")
        full = self.recompute_granularity == "full"
        if full:
            check(self.recompute_method is not None, "compute.recompute_method", self.recompute_method,
                  "'uniform' or 'block' with compute.recompute_granularity: full")
            check(self.recompute_num_layers is not None and self.recompute_num_layers >= 1,
                  "compute.recompute_num_layers", self.recompute_num_layers,
                  "an integer >= 1 with compute.recompute_granularity: full")
        else:
            for name in ("recompute_method", "recompute_num_layers"):
                check(getattr(self, name) is None, f"compute.{name}", getattr(self, name),
                      "null unless compute.recompute_granularity: full")
        if self.recompute_modules is not None:
            check(self.recompute_granularity == "selective", "compute.recompute_modules", self.recompute_modules,
                  "null unless compute.recompute_granularity: selective")
            unknown = [name for name in self.recompute_modules if name not in DENSE_RECOMPUTE_MODULES]
            check(bool(self.recompute_modules) and not unknown, "compute.recompute_modules", self.recompute_modules,
                  f"a non-empty list of {list(DENSE_RECOMPUTE_MODULES)}")

    def check_layers(self, num_layers: int, pipeline_model_parallel_size: int) -> None:
        """`recompute_num_layers` fits the layers each pipeline stage holds."""
        if self.recompute_num_layers is not None:
            per_stage = num_layers // pipeline_model_parallel_size
            check(self.recompute_num_layers <= per_stage, "compute.recompute_num_layers", self.recompute_num_layers,
                  f"at most the layers per pipeline stage ({num_layers} / {pipeline_model_parallel_size} = "
                  f"{per_stage})")

    def megatron_fields(self) -> dict:
        """TransformerConfig's recompute fields (the attention backend is set by the builder)."""
        fields = {"recompute_granularity": self.recompute_granularity, "recompute_method": self.recompute_method,
                  "recompute_num_layers": self.recompute_num_layers}
        if self.recompute_modules is not None:
            fields["recompute_modules"] = list(self.recompute_modules)
        return fields
