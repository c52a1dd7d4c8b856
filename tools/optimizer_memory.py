"""Optimizer memory per rank, plain optimizer vs Megatron's DistributedOptimizer, for a model shape.

    python tools/optimizer_memory.py                      # Qwen2.5-0.5B's shape
    python tools/optimizer_memory.py --hf-config DIR/config.json --dp 1 2 4 --tp 1

What Megatron's optimizers hold per rank for Adam: exp_avg and exp_avg_sq (fp32, 8 bytes a
parameter) and, for 16-bit parameters, the fp32 master weights (4 bytes). The plain
optimizer holds them for every parameter of its TP/PP shard; the DistributedOptimizer for
1/DP of them (up to bucket padding). Not sharded by either, and not counted here: the
parameters themselves and the fp32 gradient buffer (`grad_reduce_in_fp32`, 4 bytes).
The parameter count is the HF model's, built on the meta device (tied embeddings once).
Measured in the trainer on the tests' tiny Qwen2 (148,544 parameters, 2 ranks) it holds:
fp32 Adam state 1,188,352 bytes at DP=1, 594,432 + 593,920 at DP=2 with the
DistributedOptimizer; bf16 adds 594,176 bytes of master weights, 297,216 + 296,960 at DP=2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Qwen2.5-0.5B's config.json fields that set its parameter count.
QWEN25_05B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
              "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "tie_word_embeddings": True}


def parameter_count(hf_config: dict) -> int:
    """The model's parameters, counted on the meta device (no memory, no download)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(param.numel() for param in model.parameters())  # shared (tied) tensors once


def bytes_per_rank(params: int, dp: int, tp: int, sixteen_bit: bool, distributed: bool) -> int:
    """Adam state plus fp32 master weights held by one rank (TP splits evenly, roughly)."""
    per_param = 8 + (4 if sixteen_bit else 0)
    return per_param * params // tp // (dp if distributed else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-config", help="a config.json (default: Qwen2.5-0.5B's shape)")
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    hf_config = json.loads(Path(args.hf_config).read_text()) if args.hf_config else QWEN25_05B
    params = parameter_count(hf_config)
    print(f"{params:,} parameters, TP={args.tp}; GiB per rank (Adam state + fp32 master weights)")
    for precision, sixteen_bit in (("bf16", True), ("fp32", False)):
        for dp in args.dp:
            plain = bytes_per_rank(params, dp, args.tp, sixteen_bit, distributed=False)
            sharded = bytes_per_rank(params, dp, args.tp, sixteen_bit, distributed=True)
            print(f"  {precision} DP={dp}: plain {plain / 2**30:.2f}, DistributedOptimizer {sharded / 2**30:.2f}")


if __name__ == "__main__":
    main()
