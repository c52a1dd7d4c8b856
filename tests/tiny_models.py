"""Tiny models, reference weights and per-rank bodies shared by the parallel tests.

Rank bodies are module-level functions so the multi-process harness can pickle them.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_opd.config import ModelConfig, ParallelConfig

# GQA (4 query heads over 2 KV groups), QKV bias, QK-norm, SwiGLU, untied head.
# vocab 250 pads to 256 at TP=1 and TP=2, so every layout has the same vocab.
GQA_QKNORM = ModelConfig(
    num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
    ffn_hidden_size=96, vocab_size=250, make_vocab_size_divisible_by=64,
    add_qkv_bias=True, qk_layernorm=True, rotary_base=10000.0, norm_epsilon=1e-6,
)
# Tied embeddings: under PP the last stage holds its own copy of the embedding.
TIED = ModelConfig(
    num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
    vocab_size=256, make_vocab_size_divisible_by=64, tie_word_embeddings=True,
    rotary_base=500000.0,
)


def reference_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full (TP=1, PP=1) weights drawn from an explicit generator, never from init RNG.

    Scales keep activations O(1), so logits and gradients are far from zero and a
    wrong shard or a missing reduction shows up as an O(1) error.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    def norm_weight(size: int) -> torch.Tensor:
        return 1.0 + normal(size, std=0.1)

    hidden, head_dim = config.hidden_size, config.head_dim
    vocab = config.padded_vocab_size(1)
    qkv_rows = (config.num_attention_heads + 2 * config.query_groups) * head_dim
    fc1_rows = config.ffn_hidden_size * (2 if config.swiglu else 1)
    state = {"embedding.word_embeddings.weight": normal(vocab, hidden, std=1.0)}
    for layer in range(config.num_layers):
        prefix = f"decoder.layers.{layer}."
        state[prefix + "input_layernorm.weight"] = norm_weight(hidden)
        state[prefix + "self_attention.linear_qkv.weight"] = normal(qkv_rows, hidden, std=hidden**-0.5)
        if config.add_qkv_bias:
            state[prefix + "self_attention.linear_qkv.bias"] = normal(qkv_rows, std=0.1)
        if config.qk_layernorm:
            state[prefix + "self_attention.q_layernorm.weight"] = norm_weight(head_dim)
            state[prefix + "self_attention.k_layernorm.weight"] = norm_weight(head_dim)
        attn_width = config.num_attention_heads * head_dim
        state[prefix + "self_attention.linear_proj.weight"] = normal(hidden, attn_width, std=attn_width**-0.5)
        state[prefix + "pre_mlp_layernorm.weight"] = norm_weight(hidden)
        state[prefix + "mlp.linear_fc1.weight"] = normal(fc1_rows, hidden, std=hidden**-0.5)
        state[prefix + "mlp.linear_fc2.weight"] = normal(
            hidden, config.ffn_hidden_size, std=config.ffn_hidden_size**-0.5)
    state["decoder.final_layernorm.weight"] = norm_weight(hidden)
    if not config.tie_word_embeddings:
        state["output_layer.weight"] = normal(vocab, hidden, std=hidden**-0.5)
    return state


def token_batches(config: ModelConfig, num_microbatches: int, micro_batch_size: int,
                  seq_length: int, seed: int = 1) -> torch.Tensor:
    """Token ids `[num_microbatches, micro_batch_size, seq_length + 1]` (inputs + next-token labels)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (num_microbatches, micro_batch_size, seq_length + 1),
                         generator=generator)


def sabotage_tp_all_reduce() -> None:
    """Make the forward all-reduce of row-parallel layers a no-op (the test must notice)."""
    from megatron.core.tensor_parallel import mappings

    mappings._reduce = lambda input_, group=None: input_


def train_step_on_rank(
    config: ModelConfig,
    parallel: ParallelConfig,
    state: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    sabotage: Optional[str] = None,
    sgd_step: Optional[dict] = None,
) -> dict:
    """One forward/backward of the LM loss with Megatron's schedule, DDP and grad finalization,
    then, with `sgd_step` (OptimizerConfig fields), one step of Megatron's optimizer.

    Returns this rank's view: full-vocab logits and losses (last stage), every
    parameter's gradient re-assembled to its full shape under its global name, and
    after a step the updated weights and the optimizer's global grad norm.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_opd.models import build_gpt_model, gather_full_tensors, load_full_state_dict
    from megatron_opd.runtime import initialize_runtime
    from megatron_opd.pipeline import lm_forward_backward

    runtime = initialize_runtime(parallel)
    if sabotage == "skip_tp_all_reduce":
        sabotage_tp_all_reduce()
    model = build_gpt_model(config, runtime)
    load_full_state_dict(model, state)
    ddp_model = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    ddp_model.zero_grad_buffer()
    if sgd_step is not None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="sgd", sgd_momentum=0.0, weight_decay=0.0, **sgd_step),
            [ddp_model])

    full_logits = []

    def capture(logits: torch.Tensor) -> None:
        # Clone: at TP=1 the gather returns `logits` itself, which the loss overwrites.
        full_logits.append(gather_from_tensor_model_parallel_region(logits).detach().clone())

    losses = lm_forward_backward(ddp_model, tokens, on_logits=capture)
    finalize_model_grads([ddp_model])
    grads = dict(gather_full_tensors(ddp_model, lambda param: param.main_grad))
    last = parallel_state.is_pipeline_last_stage()
    step = {}
    if sgd_step is not None:
        _, grad_norm, _ = optimizer.step()
        step = {"grad_norm": grad_norm, "weights": dict(gather_full_tensors(ddp_model))}
    return {
        **step,
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "logits": torch.stack(full_logits) if last else None,
        "losses": losses,
        "grads": grads,
    }


def merge_ranks(results: list[dict]) -> dict:
    """One model-wide view from per-rank results: logits and losses of the last stage,
    gradients from every stage. A gradient reported twice (tied embeddings on the first
    and last stage, or several TP ranks) must agree exactly, or Megatron's
    synchronization is broken."""
    merged = {"logits": None, "losses": None, "grads": {}}
    for result in results:
        if result["logits"] is not None:
            merged["logits"], merged["losses"] = result["logits"], result["losses"]
        for name, grad in result["grads"].items():
            if name in merged["grads"]:
                torch.testing.assert_close(grad, merged["grads"][name], atol=0, rtol=0,
                                           msg=f"ranks disagree on the gradient of {name}")
            else:
                merged["grads"][name] = grad
    return merged


def max_abs_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def scaled_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|): absolute for O(1) values, relative above.
    For logits (O(1) and above); gradients and updates, often far below 1, need `relative_error`."""
    return max_abs_diff(actual, expected) / max(1.0, expected.abs().max().item())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64: relative to the tensor's own scale,
    however small; absolute only where `expected` is exactly zero everywhere."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    scale = expected.double().abs().max().item()
    return max_abs_diff(actual, expected) / (scale if scale > 0 else 1.0)


def compare(merged: dict, reference: dict) -> dict[str, float]:
    """Relative error (`relative_error`) per compared quantity (logits, losses, each gradient)."""
    if set(merged["grads"]) != set(reference["grads"]):
        raise AssertionError(
            f"gradient names differ: {sorted(set(merged['grads']) ^ set(reference['grads']))}")
    diffs = {"logits": relative_error(merged["logits"], reference["logits"]),
             "losses": relative_error(merged["losses"], reference["losses"])}
    for name, grad in reference["grads"].items():
        diffs[name] = relative_error(merged["grads"][name], grad)
    return diffs
