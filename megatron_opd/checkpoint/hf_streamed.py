"""HF transformers' own forward of a checkpoint, its weights loaded one block at a time.

`convert verify` compares our Megatron model with HF's implementation; loading the HF
model whole in fp32 next to the Megatron shard would need 4 bytes per parameter on one
rank (28 GB for a 7B model). Here the HF model is built on the meta device and each
block (the embedding, each decoder layer, the final norm, the LM head) gets its weights,
in fp32, from the memory-mapped safetensors just before it runs and drops them right
after, so the peak is one block plus activations. The computation is HF's own modules,
unchanged, so the reference stays independent of our converter.

Written here because transformers' `device_map` / disk offload needs accelerate and
keeps every block resident on some device; this needs only safetensors' mmap.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from megatron_opd.checkpoint.errors import CheckpointMismatchError
from megatron_opd.checkpoint.hf_io import HFWeightReader


class _BlockLoader:
    """Forward hooks that give a block its weights for the duration of its forward."""

    def __init__(self, reader: HFWeightReader, tied_names: dict[str, str]):
        self.reader = reader
        self.tied_names = tied_names  # a tied parameter's name -> the stored one's
        self.resident_params = self.peak_params = 0

    def attach(self, module: torch.nn.Module, prefix: str) -> None:
        module.register_forward_pre_hook(lambda mod, args: self.load(mod, prefix))
        module.register_forward_hook(lambda mod, args, output: self.release(mod))

    def load(self, module: torch.nn.Module, prefix: str) -> None:
        for owner, local_name, name in _parameter_slots(module, prefix):
            meta = owner._parameters[local_name]
            stored = self.tied_names.get(name, name)
            tensor = _stored_tensor(self.reader, stored).to(torch.float32)
            if tuple(tensor.shape) != tuple(meta.shape):
                raise CheckpointMismatchError(f"{self.reader.directory}: {stored} has shape {tuple(tensor.shape)}, "
                                 f"the model's config expects {tuple(meta.shape)}")
            # A new Parameter (meta storage cannot be swapped for CPU storage in place).
            owner._parameters[local_name] = torch.nn.Parameter(tensor, requires_grad=False)
            self.resident_params += tensor.numel()
        self.peak_params = max(self.peak_params, self.resident_params)

    def release(self, module: torch.nn.Module) -> None:
        for owner, local_name, _ in _parameter_slots(module, ""):
            loaded = owner._parameters[local_name]
            self.resident_params -= loaded.numel()
            owner._parameters[local_name] = torch.nn.Parameter(torch.empty_like(loaded, device="meta"),
                                                               requires_grad=False)


_FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)$")


def _stored_tensor(reader: HFWeightReader, name: str) -> torch.Tensor:
    """The tensor of in-memory parameter `name`. transformers 5 holds a MoE layer's experts
    fused (`experts.gate_up_proj` `[E, 2*ffn, H]` = per expert [gate; up], `experts.down_proj`
    `[E, H, ffn]`) and Mixtral's `block_sparse_moe` as `mlp`, while checkpoints store one
    tensor per expert (Qwen: `mlp.experts.{e}.gate_proj/up_proj/down_proj`, Mixtral:
    `block_sparse_moe.experts.{e}.w1/w3/w2`): stack those as transformers' loader does."""
    match = _FUSED_EXPERTS.match(name)
    if name in reader or match is None:
        return reader.get(name)
    layer, part = match.groups()
    block = f"{layer}.mlp." if f"{layer}.mlp.gate.weight" in reader else f"{layer}.block_sparse_moe."
    if part == "gate.weight":
        return reader.get(block + "gate.weight")
    mixtral = block.endswith("block_sparse_moe.")
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    count = sum(1 for stored in reader.names() if stored.startswith(block + "experts.")
                and stored.endswith(f".{down}.weight"))
    expert = [f"{block}experts.{e}." for e in range(count)]
    if part == "experts.down_proj":
        return torch.stack([reader.get(prefix + f"{down}.weight") for prefix in expert])
    return torch.stack([torch.cat([reader.get(prefix + f"{gate}.weight"), reader.get(prefix + f"{up}.weight")])
                        for prefix in expert])


def _parameter_slots(module: torch.nn.Module, prefix: str):
    """(owning module, its attribute name, full name) of every parameter under `module`."""
    for module_name, owner in module.named_modules(prefix=prefix):
        for local_name, param in owner._parameters.items():
            if param is not None:
                yield owner, local_name, f"{module_name}.{local_name}" if module_name else local_name


def _blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules that own every parameter of a Llama-style `*ForCausalLM`, in run order."""
    decoder = model.model
    blocks = [("model.embed_tokens", decoder.embed_tokens)]
    blocks += [(f"model.layers.{index}", layer) for index, layer in enumerate(decoder.layers)]
    blocks += [("model.norm", decoder.norm), ("lm_head", model.lm_head)]
    owned = sum(param.numel() for _, block in blocks for _, param in block.named_parameters(remove_duplicate=False))
    total = sum(param.numel() for _, param in model.named_parameters(remove_duplicate=False))
    if owned != total:
        raise ValueError(f"{type(model).__name__}: parameters outside embedding, layers, norm and LM head "
                         "(not a Llama-style decoder); streamed loading cannot place them")
    return blocks


@torch.no_grad()
def streamed_hf_logits(hf_path: Path | str, token_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """HF's fp32 logits `[b, s, vocab]` for `token_ids` `[b, s]`, and the most parameters
    held at once (one block's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    # Buffers computed at construction (RoPE's inverse frequencies) were computed on meta:
    # build that parameter-free module again on the CPU.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)
    model.eval()
    reader = HFWeightReader(hf_path)
    tied = {} if "lm_head.weight" in reader else {"lm_head.weight": "model.embed_tokens.weight"}
    if tied and not config.tie_word_embeddings:
        raise CheckpointMismatchError(f"{hf_path}: no lm_head.weight and tie_word_embeddings is false")
    loader = _BlockLoader(reader, tied)
    for prefix, block in _blocks(model):
        loader.attach(block, prefix)
    logits = model(token_ids).logits
    return logits, loader.peak_params
