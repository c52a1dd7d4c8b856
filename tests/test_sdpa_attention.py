"""SDPAttention (torch's fused kernel in the local spec) against Megatron-Core's own
DotProductAttention: same outputs and gradients in float64, for every case it takes over,
and Megatron's own forward wherever the fused kernel would not be exact."""

import pytest

from megatron_opd.config import ParallelConfig
from megatron_opd.testing import run_distributed

CASES = {
    "causal_gqa": dict(heads=4, groups=2, sq=12, sk=12),
    "causal_mha": dict(heads=4, groups=4, sq=9, sk=9),
    "layer_scaling": dict(heads=4, groups=2, sq=12, sk=12, apply_query_key_layer_scaling=True, layer_number=3),
    "decode_one_query": dict(heads=4, groups=2, sq=1, sk=7),
    "explicit_mask": dict(heads=4, groups=2, sq=8, sk=8, explicit_mask=True),
    "packed_mask": dict(heads=4, groups=2, sq=10, sk=10, packed_mask=True),
    "dropout_training": dict(heads=4, groups=2, sq=8, sk=8, attention_dropout=0.5, training=True),
}


def compare_with_megatron(case: dict) -> dict:
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_opd.models import sdpa_attention
    from megatron_opd.models.sdpa_attention import SDPAttention
    from megatron_opd.runtime import initialize_runtime

    runtime = initialize_runtime(ParallelConfig(tensor_model_parallel_size=case.get("tp", 1)))
    tp = runtime.parallel.tensor_model_parallel_size
    head_dim = 8
    config = TransformerConfig(
        num_layers=4, hidden_size=case["heads"] * head_dim, num_attention_heads=case["heads"],
        num_query_groups=case["groups"], tensor_model_parallel_size=tp, params_dtype=torch.float64,
        attention_dropout=case.get("attention_dropout", 0.0),
        apply_query_key_layer_scaling=case.get("apply_query_key_layer_scaling", False),
        attention_softmax_in_fp32=True, masked_softmax_fusion=False, fp16=False, bf16=False)
    modules = {}
    for name, module_class in (("megatron", DotProductAttention), ("ours", SDPAttention)):
        module = module_class(config, layer_number=case.get("layer_number", 1), attn_mask_type=AttnMaskType.causal,
                              attention_type="self")
        modules[name] = module.train(case.get("training", False))
    fused_calls = []
    real_sdpa = sdpa_attention.F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        fused_calls.append(kwargs.get("is_causal"))
        return real_sdpa(*args, **kwargs)

    sdpa_attention.F.scaled_dot_product_attention = counting_sdpa
    generator = torch.Generator().manual_seed(0)
    heads, groups = case["heads"] // tp, case["groups"] // tp
    batch = 3
    inputs = [torch.randn(length, batch, count, head_dim, generator=generator, dtype=torch.float64)
              for length, count in ((case["sq"], heads), (case["sk"], groups), (case["sk"], groups))]
    mask = None
    if case.get("explicit_mask"):  # True = masked (Megatron's convention): causal plus a padded key
        mask = torch.triu(torch.ones(case["sq"], case["sk"], dtype=torch.bool), diagonal=1)
        mask = mask.expand(batch, 1, -1, -1).clone()
        mask[0, :, 3:, 2] = True
    if case.get("packed_mask"):  # packed rows: examples of 4, 3, 2 tokens and one of padding, per row shifted
        from megatron_opd.pipeline.segments import packed_inputs

        segments = torch.tensor([[1] * 4 + [2] * 3 + [3] * 2 + [0], [1] * 2 + [2] * 5 + [3] * 3,
                                 [1] * 10])
        mask = packed_inputs(segments)[1]
    grad_output = torch.randn(case["sq"], batch, heads * head_dim, generator=generator, dtype=torch.float64)
    results = {}
    for name, module in modules.items():
        leaves = [tensor.clone().requires_grad_() for tensor in inputs]
        model_parallel_cuda_manual_seed(7)  # dropout: the same mask on both sides (Megatron's own forward)
        output = module(*leaves, attention_mask=mask)
        output.backward(grad_output)
        results[name] = [output.detach(), *(leaf.grad for leaf in leaves)]
    return {"max_error": max(float((a - b).abs().max()) for a, b in zip(results["megatron"], results["ours"])),
            "scale": max(float(t.abs().max()) for t in results["megatron"]),
            "fused_calls": fused_calls}


def core_attention_of_local_spec() -> list:
    from megatron_opd.models.builder import transformer_config
    from megatron_opd.models.layer_specs import local_block_spec
    from megatron_opd.models.sdpa_attention import SDPAttention
    from megatron_opd.runtime import initialize_runtime
    from tests.tiny_models import GQA_QKNORM

    spec = local_block_spec(transformer_config(GQA_QKNORM, initialize_runtime(ParallelConfig())))
    return [layer.submodules.self_attention.submodules.core_attention is SDPAttention for layer in spec.layer_specs]


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_megatron_dot_product_attention(name):
    case = CASES[name]
    (result,) = run_distributed(compare_with_megatron, 1, case)
    assert result["max_error"] <= 1e-12 * result["scale"], result
    takes_over = not case.get("training")
    assert len(result["fused_calls"]) == (1 if takes_over else 0), result
    if takes_over:  # causal needs the mask unless one query row attends to its whole KV cache or a mask is given
        explicit = case.get("explicit_mask") or case.get("packed_mask")
        assert result["fused_calls"] == [case["sq"] > 1 and not explicit]


def test_matches_under_tensor_parallelism():
    results = run_distributed(compare_with_megatron, 2, {**CASES["causal_gqa"], "tp": 2})
    for result in results:
        assert result["max_error"] <= 1e-12 * result["scale"] and result["fused_calls"] == [True], result


def test_local_spec_uses_it():
    (uses,) = run_distributed(core_attention_of_local_spec, 1)
    assert uses and all(uses)
