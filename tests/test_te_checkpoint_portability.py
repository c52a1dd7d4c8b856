"""Checkpoints move between the local layer spec (CPU) and Transformer Engine's (GPU).

Both specs save under TE's names (the local spec maps `input_layernorm.` to
`self_attention.linear_qkv.layer_norm_` and `pre_mlp_layernorm.` to
`mlp.linear_fc1.layer_norm_`, `sharded_state_dict_keys_map`), but TE's modules also
carry `_extra_state` (FP8 scaling metadata; an empty uint8 tensor without FP8), which
Megatron saves as a ShardedObject. Megatron's local linears save an empty one too, for
compatibility; our local norms do not, where TE's norms (the Q/K norms and the final
norm, TENorm) do: a local-spec checkpoint lacks those.

Without a GPU, TE is stood in for by the local modules plus `get_extra_state` /
`set_extra_state` exactly as TE's `TransformerEngineBaseModule` defines them (an empty
`torch.uint8` tensor when FP8 is off), on the modules TE's GPT spec makes TE modules
(linear_qkv, linear_proj, linear_fc1, linear_fc2, core_attention). The stand-in's
sharded keys are checked against TE's spec module names (Megatron's own spec module),
so the stand-in cannot drift from what TE would save.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from megatron_opd.config import ModelConfig, ParallelConfig
from megatron_opd.testing import run_distributed

MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=128, vocab_size=250, make_vocab_size_divisible_by=64, qk_layernorm=True)
# The layer submodules TE's GPT layer spec builds from Transformer Engine (each with extra
# state); checked against Megatron's spec function in test_te_spec_modules_are_these.
TE_MODULES = ("self_attention.linear_qkv", "self_attention.core_attention", "self_attention.linear_proj",
              "self_attention.q_layernorm", "self_attention.k_layernorm", "mlp.linear_fc1", "mlp.linear_fc2")


def _te_slots(spec, prefix: str = "") -> set[str]:
    """Paths of the submodule slots of `spec` filled by the stand-in TE provider's markers."""
    found = set()
    submodules = _submodules(spec)
    if submodules is None:
        return found
    for field in dataclasses.fields(submodules):
        value = getattr(submodules, field.name)
        path = f"{prefix}{field.name}"
        if isinstance(value, type) and value.__name__.startswith("TEMarker"):
            found.add(path)
        elif _submodules(value) is not None:
            found |= _te_slots(value, path + ".")
    return found


def _submodules(spec):
    """A spec's submodules: a ModuleSpec's field, or (Megatron-Core 0.19's MLP) the
    `submodules` keyword of a functools.partial."""
    if isinstance(spec, functools.partial):
        return spec.keywords.get("submodules")
    return getattr(spec, "submodules", None)


def _with_submodules(spec, submodules):
    if isinstance(spec, functools.partial):
        return functools.partial(spec.func, *spec.args, **{**spec.keywords, "submodules": submodules})
    return dataclasses.replace(spec, submodules=submodules)


def test_te_spec_modules_are_these(monkeypatch):
    """Megatron's own TE layer spec, built with a provider whose every class is a marker
    (TE itself is absent here): the slots it fills are TE_MODULES, and the norms before
    attention and MLP are fused into linear_qkv / linear_fc1 (no module of their own)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.identity_op import IdentityOp

    class MarkerProvider:
        def __getattr__(self, name):
            if name == "fuse_layernorm_and_linear":
                return lambda: True
            return lambda *args, **kwargs: type(f"TEMarker_{name}", (), {})

    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", MarkerProvider, raising=False)
    spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    assert _te_slots(spec) == set(TE_MODULES)
    assert spec.submodules.input_layernorm is IdentityOp and spec.submodules.pre_mlp_layernorm is IdentityOp


def _with_te_extra_state(cls):
    """`cls` with TE's extra-state protocol (TransformerEngineBaseModule, FP8 off)."""

    class WithExtraState(cls):
        def get_extra_state(self) -> torch.Tensor:
            return torch.empty(0, dtype=torch.uint8)

        def set_extra_state(self, state) -> None:
            self.loaded_extra_state = state

    WithExtraState.__name__ = f"TEStandIn{cls.__name__}"
    return WithExtraState


def _replace_at(spec, path: list[str]):
    """`spec` with the class at `path` given TE's extra state."""
    head, *rest = path
    value = getattr(_submodules(spec), head)
    value = _replace_at(value, rest) if rest else _with_te_extra_state(value)
    return _with_submodules(spec, dataclasses.replace(_submodules(spec), **{head: value}))


def _te_stand_in_block_spec(config, impl):
    """The local spec with TE's extra state on TE_MODULES and on the final norm (TENorm)."""
    from megatron_opd.models.layer_specs import local_block_spec

    block = local_block_spec(config)
    layer = block.layer_specs[0]
    for path in TE_MODULES:
        layer = _replace_at(layer, path.split("."))
    return dataclasses.replace(block, layer_specs=[layer] * len(block.layer_specs),
                               layer_norm=_with_te_extra_state(block.layer_norm))


def _save_then_load(directory: str, save_te: bool, load_te: bool, tp: int) -> dict:
    from megatron_opd.checkpoint.megatron_checkpoint import CheckpointInfo, load_model_checkpoint, save_model_checkpoint
    from megatron_opd.models import builder, gather_full_tensors
    from megatron_opd.runtime import initialize_runtime

    runtime = initialize_runtime(ParallelConfig(tensor_model_parallel_size=tp))
    original_spec = builder.block_spec

    def build(te: bool, seed: int):
        builder.block_spec = _te_stand_in_block_spec if te else original_spec
        try:
            torch.manual_seed(seed)
            return builder.build_gpt_model(MODEL, runtime)
        finally:
            builder.block_spec = original_spec

    source = build(save_te, seed=1)
    keys = sorted(key for key in source.sharded_state_dict() if key.endswith("_extra_state"))
    out = __import__("pathlib").Path(directory)
    if runtime.rank == 0:
        out.mkdir()
    torch.distributed.barrier()
    save_model_checkpoint(source, CheckpointInfo(MODEL, "qwen2", "fp32", {}), out)
    target = build(load_te, seed=2)
    load_model_checkpoint(target, out)
    saved = dict(gather_full_tensors(source))
    loaded = dict(gather_full_tensors(target))
    return {"extra_state_keys": keys, "equal": all(torch.equal(saved[name], loaded[name]) for name in saved),
            "names_match": sorted(saved) == sorted(loaded)}


@pytest.mark.parametrize("save_te, load_te", [
    (False, True), pytest.param(True, False, marks=pytest.mark.slow), pytest.param(True, True, marks=pytest.mark.slow),
], ids=["local_to_te", "te_to_local", "te_to_te"])  # local_to_te (the case that failed) in the default suite
def test_checkpoints_move_between_specs(tmp_path, save_te, load_te):
    """TP=2: a checkpoint written by one spec loads into the other with every weight equal;
    the TE side's extra state is where TE has it (restored when saved, default when not)."""
    results = run_distributed(_save_then_load, 2, str(tmp_path / "ckpt"), save_te, load_te, 2, timeout=180)
    linears = {f"decoder.layers.{i}.{module}._extra_state" for i in range(2)
               for module in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                              "mlp.linear_fc2")}
    norms = {f"decoder.layers.{i}.self_attention.{norm}._extra_state" for i in range(2)
             for norm in ("q_layernorm", "k_layernorm")} | {"decoder.final_layernorm._extra_state"}
    for result in results:
        assert result["names_match"] and result["equal"]
        # Megatron's local linears save an empty extra state "for compatibility with TE";
        # norms have none. TE's norms do, and TEDotProductAttention saves none.
        assert set(result["extra_state_keys"]) == (linears | norms if save_te else linears)


def test_te_fused_norm_names_are_megatrons():
    """`tp_layout` names TE's fused norms as the local spec's separate ones: the same pairs
    Megatron's local spec maps its norms to when it saves (TE's names), both directions."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_opd.models.tp_layout import _TE_FUSED_NORMS

    keys_map = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    megatron_pairs = {f"{te_prefix}weight": f"{local_prefix}weight" for local_prefix, te_prefix in keys_map.items()}
    assert _TE_FUSED_NORMS == megatron_pairs
