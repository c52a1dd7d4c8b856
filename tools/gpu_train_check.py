"""GPU acceptance check of the training side: TE-spec logits (dense, MoE), MoE EP parity, conversion,
the divergence kernel, TP parity, bf16 GKD.

    python tools/gpu_train_check.py                          # every check, CUDA (TE spec when installed)
    python tools/gpu_train_check.py --checks kernel_vs_eager,trainer_tp2_parity
    python tools/gpu_train_check.py --device cpu             # gloo ranks, tiny sizes: the script's own logic
    python tools/gpu_train_check.py --device cpu --break-on-purpose   # every check must FAIL

`bash tools/gpu_acceptance.sh` runs it. Each check starts its ranks with
`megatron_opd.testing.run_distributed` (MEGATRON_OPD_DEVICE=cuda: NCCL, one GPU per rank;
cpu: gloo) and prints PASS/FAIL/INFO/SKIP lines, as tools/gpu_vllm_check.py does. TF32 is
off in every rank (torch.backends.cuda.matmul / cudnn .allow_tf32 = False): the fp32 checks
compare against fp32 math.

  te_logits_vs_hf     A random Qwen2.5-0.5B-shaped Qwen2 model (24 layers, hidden 896, 14
                      heads / 2 KV heads, FFN 4864, vocab 151,936, tied embeddings, QKV bias;
                      tests.hf_models.randomize, the embedding rescaled so that the tied head
                      gives logits of std ~3, bf16 weights on disk) loaded by
                      `load_pretrained(..., dtype=bf16, compute=ComputeConfig(transformer_impl="auto"))`
                      (TE spec on CUDA with TE installed; the line says which spec ran). Its
                      logits on 2 x 512 random ids against HF transformers' fp32 forward of the
                      same directory (eager attention, TF32 off), relative to the reference's
                      std: max <= LOGITS_TOL["max"], mean <= LOGITS_TOL["mean"]. HF's own bf16
                      forward against the same reference is printed beside it (INFO). Control:
                      every layer's QKV bias zeroed must exceed the tolerance (the check can fail).
  te_moe_logits_vs_hf The same for a random Qwen3-MoE model with Qwen3-30B-A3B's layer shapes
                      at 3 layers (QWEN3_MOE_FULL: hidden 2048, 32 / 4 heads of 128, layer 0
                      dense (FFN 6144, `mlp_only_layers`), layers 1-2 with 128 experts of FFN
                      768, top-8 renormalised; vocab 151,936, untied head rescaled for logits of
                      std ~3; bf16 on disk): on CUDA with TE the TE spec's grouped-GEMM experts
                      (TEGroupedMLP, `linear_fc1.weight{e}`) and the alltoall token dispatcher,
                      the first time they run (the setup line lists layer 1's names). Routing is
                      discontinuous: a token whose k-th and (k+1)-th router scores nearly tie
                      picks another expert under bf16 rounding (HF's own bf16 forward does too),
                      so a few tokens differ by far more than the rest; the tolerance (MOE_TOL)
                      is on the mean and on the 90th percentile over tokens of each token's max
                      |diff|, and the max and the count of tokens above LOGITS_TOL["max"] are
                      printed beside HF bf16's. Control: experts 0 and 1 of layer 1 swapped (fc1
                      and fc2: a converter numbering experts wrongly) must exceed the q90 one.
  moe_ep2_parity      (2+ GPUs; CPU: 2 gloo ranks) that MoE model's fp32 logits (TF32 off) at
                      EP=2 (64 experts per GPU, the alltoall dispatcher over NCCL, TE grouped
                      GEMM) against EP=1 on one GPU: max |diff| / std <= MOE_EP_TOL. 1 GPU: SKIP.
  convert_round_trip  `convert.hf_to_megatron` then `convert.megatron_to_hf` (TP=2 with 2+ GPUs,
                      else 1; CPU: TP=2 on gloo) of that model: every tensor of the written
                      safetensors bit-equal (and of the same dtype) to the source's, the same
                      names; the Megatron checkpoint loaded by `load_pretrained` (auto spec: TE on
                      GPU) bit-equal, parameter by parameter, to the model loaded from HF; the
                      dist-checkpoint's keys are TE's names (linear_qkv.layer_norm_weight,
                      linear_fc1.layer_norm_weight), whichever spec saved it. (The converters
                      build the auto spec: TE on CUDA; without TE installed they would refuse
                      CUDA, so this check then converts on CPU ranks and says so.)
  kernel_vs_eager     `ops.fused_linear_divergence` (what the trainer calls: hidden states and LM
                      head, chunked) at 4096 tokens x 151,936 vocab, bf16, student hidden 896,
                      teacher hidden 1536, JSD beta 0.5, 10% of tokens masked, forward + backward,
                      against eager dense math (bf16 matmul, log_softmax of both in float32, the
                      beta-JSD written out, autograd): the loss within KERNEL_TOL["loss"]
                      (relative), the student hidden / LM-head gradients within
                      KERNEL_TOL["grad"] (max |diff| / max |eager|). Time and peak CUDA memory
                      above the inputs (max_memory_allocated after reset_peak_memory_stats) of
                      both, forward + backward, the second of two runs.
  trainer_tp2_parity  (2+ GPUs; CPU: 2 gloo ranks) one GKD step of the real Trainer, SGD lr=1,
                      no clipping (tests.helpers.trainer_runs.SGD: the update is minus the
                      gradient), fp32, at TP=2 against TP=1 from the same weights: every tensor's
                      update within PARITY_RTOL of its largest (tests' PARITY_RTOL), the loss
                      within 1e-5. 1 GPU: SKIP.
  packed_thd_parity   the same GKD step at TP=1 with packed rows (training.pack_sequences, rows of
                      64 tokens: under Transformer Engine THD with PackedSeqParams, on the local
                      spec block-diagonal masks) against fixed rows: the same tolerances.
  bf16_gkd_steps      20 GKD steps (forward KL, beta 0) of the real Trainer, bf16 (fp32 master
                      weights), Adam lr 1e-2, clip 1.0, TP=2 (1 GPU: TP=1), a student qwen2
                      (hidden 64, 4 layers, tied) and a bigger teacher llama2 (hidden 128, 6
                      layers): every loss and grad norm finite, the mean loss of the last 5 steps
                      < BF16_DECREASE x the mean of the first 5. The same models as on CPU, so
                      the CPU measurement of the margin applies.

Tolerances and the measurements behind them (see the constants below). --break-on-purpose
breaks each check's candidate in a known way (a zeroed QKV bias; two experts swapped, in both
MoE checks; one weight nudged before the Megatron checkpoint is written; the kernel run at beta
0.45; the TP=2 and the packed loss scaled by 1.001; bf16 lr 1e-9): every check must then FAIL, which is how its
discrimination was verified.

Sizes (--size tiny, the default with --device cpu, shrinks te_logits_vs_hf / convert_round_trip to a
2-layer model of the same head layout and vocab 1000, te_moe_logits_vs_hf to 2 layers (dense,
MoE) of hidden 64, 8 experts top-2, vocab 1000, and the kernel to 512 x 8192): on one H200,
about 4.5 minutes for the seven before packed_thd_parity (estimated ~5 with it), most of it
process start-up, model writing and conversion of the 0.5B model (~1 GB bf16) and writing the
MoE one (1.9B parameters, 3.8 GB bf16): logits ~50 s, MoE logits ~70 s, MoE EP=2 ~40 s,
convert ~60 s, kernel ~20 s, parity ~40 s, bf16 ~30 s (estimates from the CPU runs: not yet
measured on a GPU). CPU, tiny: ~40 s on 2 cores.

Needs (MISSING lines before anything runs): torch, megatron-core, transformers, safetensors, and
with --device cuda a CUDA device; Transformer Engine is optional (without it the auto spec on
CUDA is refused by `load_pretrained`, so the checks ask for the local spec and say so).
Exit codes: 0 all checks passed (SKIP allowed), 1 a check failed, 2 could not run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.gpu_check_report import COMMON_MODULES, Report, add_run_arguments, preflight, selected  # noqa: E402 - after the repository is on sys.path

CHECKS = ("te_logits_vs_hf", "te_moe_logits_vs_hf", "moe_ep2_parity", "convert_round_trip", "kernel_vs_eager",
          "trainer_tp2_parity", "packed_thd_parity", "bf16_gkd_steps")

# Qwen2.5-0.5B's shape; --size tiny: 2 layers of the same head layout (head dim 8) and vocab 1000.
QWEN_05B = dict(num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                head_dim=64, intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
QWEN_TINY = dict(QWEN_05B, num_hidden_layers=2, hidden_size=112, head_dim=8, intermediate_size=304, vocab_size=1000)
LOGIT_STD = 3.0  # the tied embedding's scale is set for logits of about this std (randomize's gives ~sqrt(H))
LOGITS_SHAPE = {"full": (2, 512), "tiny": (2, 64)}
# Logits |Megatron bf16 - HF fp32| / std(HF fp32 logits), over every token and vocab entry.
# Basis, measured on CPU (HF transformers bf16 vs fp32 on the same bf16-valued weights; Megatron
# local spec bf16; reference logits std 3.0, max |.| 15.7):
#   0.5B shape (24 layers, 1 x 64 tokens): HF bf16 max 0.110 mean 0.0149, Megatron bf16 max 0.117 mean 0.0149
#   tiny (2 layers, 2 x 64 tokens):        HF bf16 max 0.064 mean 0.0085, Megatron bf16 max 0.057 mean 0.0087
# Tolerance: 2x and 2.5x those (TE's kernels round at other places: flash attention, fused
# norm + GEMM; the max grows slowly with the 16x more values of 2 x 512 tokens). Controls: every
# layer's QKV bias zeroed, max 3.7 mean 0.45 (0.5B shape); one layer's of 24, max 0.23 mean
# 0.035 (just caught by the mean).
LOGITS_TOL = {"max": 0.3, "mean": 0.03}

# Qwen3-30B-A3B's layer shapes at 3 layers (layer 0 dense, as `mlp_only_layers=[0]` makes it;
# 1-2 with 128 experts, top-8, renormalised): 1.9B parameters, 3.8 GB in bf16 (all 48 layers
# would be 30B). --size tiny: 2 layers (dense, MoE) of the same head layout (head dim 8), 8
# experts top-2, vocab 1000.
QWEN3_MOE_FULL = dict(num_hidden_layers=3, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                      head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                      num_experts_per_tok=8, norm_topk_prob=True, mlp_only_layers=[0], vocab_size=151936,
                      max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, router_aux_loss_coef=0.001)
QWEN3_MOE_TINY = dict(QWEN3_MOE_FULL, num_hidden_layers=2, hidden_size=64, head_dim=8, intermediate_size=192,
                      moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, vocab_size=1000)
# Logits |Megatron bf16 - HF fp32| / std(HF fp32 logits), like LOGITS_TOL, but on the mean and
# on the 90th percentile over tokens of each token's max over the vocab ("token_q90"): routing
# flips (near-tied k-th / (k+1)-th router scores resolved otherwise under bf16) give a few
# percent of the tokens errors of 0.3-1, so the max measures the flips, not the rounding.
# Measured on CPU (local spec bf16, 2 x 512 tokens, reference std 3.0):
#   full shape, vocab 32,000 (3 layers, 128 experts top-8): Megatron mean 0.0087 q90 0.035 (max
#     0.57, 21 of 1024 tokens above 0.3); HF bf16 mean 0.012 q90 0.21 (max 0.57, 34 tokens:
#     HF's router GEMM is bf16, Megatron's fp32 (moe_router_dtype), so HF flips more)
#   tiny (2 layers, 8 experts top-2): Megatron mean 0.0053 q90 0.027 (max 0.98: one flip, 2
#     tokens above 0.3); HF bf16 mean 0.0052 q90 0.028 (max 0.67, 1 token)
# Tolerance: 2.5x and 2.3x the full shape's. Control, experts 0 and 1 of layer 1 swapped: full
# shape q90 0.33 mean 0.018 (121 tokens above 0.3; the 16 of 128 expert slots it changes are
# too few to move the mean past the tolerance, so the control must exceed the q90 one: 3.7x);
# tiny q90 1.55 mean 0.13.
MOE_TOL = {"token_q90": 0.09, "mean": 0.02}

# moe_ep2_parity: max |EP=2 - EP=1| / std(EP=1), fp32 logits of the MoE model above. Measured
# on CPU (gloo, allgather dispatcher, local spec, tiny): 0 (bit-equal); broken on purpose, two
# experts swapped at EP=2: 2.9. On CUDA the alltoall dispatcher and TE's grouped GEMM change
# only which GEMM (of how many rows) a token's expert product is in, and the order of the
# permutation: fp32 rounding, far below the 1e-4 at which tests/test_moe_hf_logits.py holds
# EP=2 against HF fp32 (a near-tied routing flip in fp32 would be a ~1e-6 event per token).
MOE_EP_TOL = 1e-4

KERNEL_SHAPE = {"full": dict(tokens=4096, vocab=151936, student_hidden=896, teacher_hidden=1536),
                "tiny": dict(tokens=512, vocab=8192, student_hidden=112, teacher_hidden=192)}
# Kernel vs eager, bf16 inputs, both with softmax math in fp32 from the same bf16 logits.
# Measured on CPU: tiny (512 x 8192) loss relative 1e-7, gradients max |diff| / max |eager|
# 7.1e-3 (hidden) / 6.6e-3 (head); 1024 x 151,936 at hidden 896 / 1536: loss 2.4e-6, gradients
# 4.0e-3 / 5.6e-3 (the eager backward rounds the logits' gradient to bf16 before its matmuls,
# the kernel keeps it fp32: about one bf16 rounding, 2^-8). Broken on purpose (tiny): softmax
# statistics in bf16 (ops.vocab_parallel.compute_dtype returning the input dtype) give loss
# 1.1e-2, gradients 8.0e-2; beta 0.45 for 0.5 loss 7.6e-3, gradients 3.4e-2.
KERNEL_TOL = {"loss": 1e-4, "grad": 2e-2}
BETA = 0.5

# tests.helpers.trainer_runs.PARITY_RTOL. Measured on CPU (gloo) with these models: worst tensor
# 2.3e-5 of its largest update (layer 2's linear_proj), median 1.4e-5, loss equal to 1e-8.
# Broken on purpose, the TP=2 loss scaled by 1.001: 1.0e-3 on every tensor.
PARITY_RTOL = 5e-5
PARITY_LOSS_ATOL = 1e-5
# The GKD pair of the parity and bf16 checks (vocab 300: tests' word-level tokenizer).
STUDENT = dict(num_hidden_layers=4, hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128)
TEACHER = dict(num_hidden_layers=6, hidden_size=128, head_dim=16, num_attention_heads=8, num_key_value_heads=2,
               intermediate_size=256)
BF16_STEPS = 20
BF16_LR = 1e-2
BF16_BETA = 0.0  # forward KL: unbounded, unlike JSD(0.5) <= ln 2, so learning shows far above batch noise
# Mean loss of the last 5 steps / mean of the first 5, measured on CPU (gloo, TP=2, these models):
# 0.137 (28.0 -> 2.2); lr 1e-9 (no learning, the batches' own spread): 0.989. With JSD(0.5)
# instead the ratio is only 0.90 (0.68 -> 0.60, bounded by ln 2), too close to 1 to set a margin.
BF16_DECREASE = 0.5


# ============================================================================ on each rank

def _no_tf32() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def _impl(requested: str, device_type: str) -> tuple[str, str]:
    """The transformer_impl to ask load_pretrained for, and why."""
    from megatron_opd.models.layer_specs import has_transformer_engine, resolve_transformer_impl

    if requested == "auto" and device_type == "cuda" and not has_transformer_engine():
        return "local", "local layer spec (no transformer_engine installed)"
    return requested, f"{resolve_transformer_impl(requested, device_type)} layer spec ({requested})"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _logit_diffs(actual, expected) -> dict:
    """|actual - expected| / std(expected) over [batch, tokens, vocab]: max, mean; per token (its
    max over the vocab): the 99th percentile and the count above LOGITS_TOL["max"]; argmax agreement."""
    import torch

    scale = float(expected.std())
    diff = (actual.float() - expected.float()).abs() / scale
    per_token = diff.amax(-1).flatten()
    return {"max": float(diff.max()), "mean": float(diff.mean()),
            "token_q90": float(torch.quantile(per_token, 0.9)), "token_q99": float(torch.quantile(per_token, 0.99)),
            "tokens_over": int((per_token > LOGITS_TOL["max"]).sum()), "tokens": per_token.numel(),
            "argmax_agree": float((actual.argmax(-1) == expected.argmax(-1)).float().mean())}


def qkv_bias_control(model, config: dict) -> tuple[str, list]:
    """A converter that drops Qwen2's QKV biases: every layer's zeroed. (what, [(parameter, its value)])"""
    import torch

    biases = [p for n, p in model.named_parameters() if n.endswith("self_attention.linear_qkv.bias")]
    assert len(biases) == config["num_hidden_layers"], [n for n, _ in model.named_parameters() if "bias" in n][:8]
    return "every layer's QKV bias zeroed", [(bias, torch.zeros_like(bias)) for bias in biases]


def expert_swap_control(model, config: dict) -> tuple[str, list]:
    """A converter that swaps two experts of one MoE layer (0 <-> 1 of the first one, fc1 and fc2):
    local_experts.{e}.linear_fc1.weight (SequentialMLP) or linear_fc1.weight{e} (TE grouped)."""
    layer = _first_moe_layer(config)
    params = list(model.named_parameters())

    def expert(fc: str, e: int):
        suffixes = (f".layers.{layer}.mlp.experts.local_experts.{e}.linear_{fc}.weight",
                    f".layers.{layer}.mlp.experts.linear_{fc}.weight{e}")
        found = [p for n, p in params if n.endswith(suffixes)]
        assert len(found) == 1, (fc, e, [n for n, _ in params if f".layers.{layer}.mlp.experts." in n][:6])
        return found[0]

    pairs = []
    for fc in ("fc1", "fc2"):
        first, second = expert(fc, 0), expert(fc, 1)
        pairs += [(first, second.detach().clone()), (second, first.detach().clone())]
    return f"experts 0 and 1 of layer {layer} swapped (fc1, fc2)", pairs


def _first_moe_layer(config: dict) -> int:
    return next(i for i in range(config["num_hidden_layers"]) if i not in config.get("mlp_only_layers", []))


CONTROLS = {"qkv_bias": qkv_bias_control, "expert_swap": expert_swap_control}


def _layer_names(model, layer: int) -> list[str]:
    """Parameter names of one layer, after `.layers.{layer}.`, experts' numbers shown as *."""
    import re

    names = []
    for name, _ in model.named_parameters():
        if f".layers.{layer}." in name:
            short = re.sub(r"local_experts\.\d+\.", "local_experts.*.", name.split(f".layers.{layer}.", 1)[1])
            short = re.sub(r"\.weight\d+$", ".weight*", short)
            if short not in names:
                names.append(short)
    return names


def logits_on_rank(model_dir: str, shape: tuple[int, int], transformer_impl: str, sabotage: bool,
                   control: str = "qkv_bias") -> dict:
    """Megatron bf16 logits (load_pretrained) and HF's bf16 against HF's fp32; stats only.
    `control` (CONTROLS) names the converter bug whose logits must be caught."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_opd.checkpoint import load_pretrained
    from megatron_opd.config import ParallelConfig
    from megatron_opd.config.compute import ComputeConfig
    from megatron_opd.runtime import initialize_runtime

    _no_tf32()
    runtime = initialize_runtime(ParallelConfig())
    device = runtime.device
    impl, how = _impl(transformer_impl, device.type)
    started = time.monotonic()
    model = load_pretrained(model_dir, runtime, role="teacher", dtype=torch.bfloat16,
                            compute=ComputeConfig(transformer_impl=impl))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    shown = _first_moe_layer(config) if control == "expert_swap" else 0  # the layer the control changes
    out = {"device": str(device), "spec": how, "load_s": time.monotonic() - started, "layer": shown,
           "names": _layer_names(model, shown)}
    vocab = config["vocab_size"]
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(11)).to(device)
    positions = torch.arange(shape[1], device=device).expand(*shape)

    def megatron_logits():
        with torch.no_grad():
            return model(ids, positions, None)[..., :vocab].float()

    mine = megatron_logits()
    out["control_what"], changes = CONTROLS[control](model, config)
    saved = [param.detach().clone() for param, _ in changes]
    with torch.no_grad():
        for param, value in changes:
            param.copy_(value)
    control_logits = megatron_logits()
    with torch.no_grad():
        for (param, _), value in zip(changes, saved):
            param.copy_(value)
    if sabotage:
        mine = control_logits
    model = changes = saved = None  # free it before HF loads (the closure above is done with it)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").to(device)
    with torch.no_grad():
        reference = hf(ids).logits.float()
        hf.to(torch.bfloat16)
        hf_bf16 = hf(ids).logits.float()
    out.update(megatron=_logit_diffs(mine, reference), hf_bf16=_logit_diffs(hf_bf16, reference),
               control=_logit_diffs(control_logits, reference), ref_std=float(reference.std()),
               ref_absmax=float(reference.abs().max()), tokens=shape)
    return out


def moe_ep_logits_on_rank(model_dir: str, shape: tuple[int, int], transformer_impl: str, ep: int,
                          sabotage: bool) -> dict:
    """fp32 logits [batch, tokens, vocab] of the MoE model at EP=`ep` (TP=1: every rank feeds the
    same ids, rank 0's are returned); `sabotage` swaps two experts (expert_swap_control)."""
    import torch
    import torch.distributed as dist

    from megatron_opd.checkpoint import load_pretrained
    from megatron_opd.config import ParallelConfig
    from megatron_opd.config.compute import ComputeConfig
    from megatron_opd.runtime import initialize_runtime

    _no_tf32()
    runtime = initialize_runtime(ParallelConfig(expert_model_parallel_size=ep))
    device = runtime.device
    impl, how = _impl(transformer_impl, device.type)
    model = load_pretrained(model_dir, runtime, role="teacher", dtype=torch.float32,
                            compute=ComputeConfig(transformer_impl=impl))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if sabotage:
        with torch.no_grad():
            for param, value in expert_swap_control(model, config)[1]:
                param.copy_(value)
    vocab = config["vocab_size"]
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(11)).to(device)
    positions = torch.arange(shape[1], device=device).expand(*shape)
    with torch.no_grad():
        logits = model(ids, positions, None)[..., :vocab].float()
    dispatcher = getattr(getattr(model, "config", None), "moe_token_dispatcher_type", "?")
    return {"spec": how, "dispatcher": dispatcher, "logits": logits.cpu() if dist.get_rank() == 0 else None}


def convert_on_rank(hf_dir: str, work: str, tp: int, transformer_impl: str, sabotage: bool) -> dict:
    """hf_to_megatron, megatron_to_hf; then both loads into the auto-spec model, compared here."""
    import torch
    import torch.distributed as dist

    from megatron_opd.checkpoint import convert, load_pretrained
    from megatron_opd.checkpoint.megatron_checkpoint import DIST_DIR
    from megatron_opd.config import ParallelConfig
    from megatron_opd.config.compute import ComputeConfig
    from megatron_opd.models import gather_full_tensors
    from megatron_opd.runtime import initialize_runtime

    _no_tf32()
    work = Path(work)
    if sabotage:  # nudge one weight of the model just before the Megatron checkpoint is written
        save = convert.save_model_checkpoint

        def nudged_save(model, *args, **kwargs):
            with torch.no_grad():
                param = next(p for n, p in model.named_parameters() if "linear_fc2.weight" in n)
                param.view(-1)[0] += 0.01
            return save(model, *args, **kwargs)

        convert.save_model_checkpoint = nudged_save
    times = {}
    started = time.monotonic()
    convert.hf_to_megatron(Path(hf_dir), work / "megatron", tp=tp)
    times["hf_to_megatron_s"] = time.monotonic() - started
    started = time.monotonic()
    convert.megatron_to_hf(work / "megatron", work / "hf_back", tp=tp)
    times["megatron_to_hf_s"] = time.monotonic() - started
    runtime = initialize_runtime(ParallelConfig(tensor_model_parallel_size=tp))
    impl, how = _impl(transformer_impl, runtime.device.type)
    compute = ComputeConfig(transformer_impl=impl)
    from_megatron = load_pretrained(work / "megatron", runtime, dtype=torch.bfloat16, compute=compute)
    from_hf = load_pretrained(hf_dir, runtime, dtype=torch.bfloat16, compute=compute)
    expected = dict(gather_full_tensors(from_hf))
    unequal, names = [], []
    for name, tensor in gather_full_tensors(from_megatron):
        names.append(name)
        if name not in expected or not torch.equal(tensor, expected[name]):
            unequal.append(name)
    out = {"spec": how, "params": len(names), "unequal": unequal, "missing": sorted(set(expected) - set(names)),
           "names": [n for n, _ in from_megatron.named_parameters() if ".layers.0." in n], **times}
    if dist.get_rank() == 0:
        from torch.distributed.checkpoint import FileSystemReader

        out["checkpoint_keys"] = sorted(FileSystemReader(str(work / "megatron" / DIST_DIR)).read_metadata()
                                        .state_dict_metadata)
    return out


def kernel_on_rank(shape: dict, sabotage: bool) -> dict:
    """fused_linear_divergence vs eager dense math: value, gradients, time, peak memory."""
    import torch
    import torch.nn.functional as F

    from megatron_opd.ops import fused_linear_divergence

    _no_tf32()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if os.environ.get(
        "MEGATRON_OPD_DEVICE") == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    generator = torch.Generator().manual_seed(5)
    n, vocab, hs, ht = shape["tokens"], shape["vocab"], shape["student_hidden"], shape["teacher_hidden"]

    def make(*size, scale=1.0):
        return (torch.randn(*size, generator=generator) * scale).to(device=device, dtype=torch.bfloat16)

    # logits std ~2 (student) and ~3 (teacher): peaked enough that the softmax matters
    student_hidden, student_head = make(n, hs), make(vocab, hs, scale=2.0 / math.sqrt(hs))
    teacher_hidden, teacher_head = make(n, ht), make(vocab, ht, scale=3.0 / math.sqrt(ht))
    mask = (torch.rand(n, generator=generator) > 0.1).to(device)
    kernel_beta = 0.45 if sabotage else BETA

    def kernel(h, w):
        return fused_linear_divergence(h, w, teacher_hidden, teacher_head, beta=kernel_beta, mask=mask,
                                       reduction="mean")

    def eager(h, w):
        student_logp = F.log_softmax((h @ w.T).float(), dim=-1)
        teacher_logp = F.log_softmax((teacher_hidden @ teacher_head.T).float(), dim=-1)
        beta = torch.tensor(BETA, device=device)
        mixture = torch.logsumexp(torch.stack([teacher_logp + torch.log(beta),
                                               student_logp + torch.log1p(-beta)]), dim=0)
        per_token = (beta * (teacher_logp.exp() * (teacher_logp - mixture)).sum(-1)
                     + (1 - beta) * (student_logp.exp() * (student_logp - mixture)).sum(-1))
        return (per_token * mask).sum() / mask.sum()

    def measure(fn) -> dict:
        result = {}
        for attempt in range(2):  # the second: no first-call set-up in the time
            h = student_hidden.detach().clone().requires_grad_(True)
            w = student_head.detach().clone().requires_grad_(True)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            started = time.perf_counter()
            loss = fn(h, w)
            loss.backward()
            _sync(device)
            elapsed = time.perf_counter() - started
            result = {"loss": float(loss), "grad_hidden": h.grad.float().cpu(), "grad_head": w.grad.float().cpu(),
                      "seconds": elapsed}
            if device.type == "cuda":
                result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
            del loss, h, w
            if device.type != "cuda":
                break  # CPU: one run (the time is for information only)
        return result

    mine = measure(kernel)
    reference = measure(eager)

    def relative(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    out = {"device": str(device), "shape": shape, "kernel": {k: v for k, v in mine.items() if "grad" not in k},
           "eager": {k: v for k, v in reference.items() if "grad" not in k},
           "loss_rel": abs(mine["loss"] - reference["loss"]) / abs(reference["loss"]),
           "grad_hidden_rel": relative(mine["grad_hidden"], reference["grad_hidden"]),
           "grad_head_rel": relative(mine["grad_head"], reference["grad_head"])}
    return out


def train_on_rank(argv: list[str], steps: int, weights: bool, loss_scale: float) -> dict:
    """tests.helpers.trainer_runs.train_on_rank with TF32 off; `loss_scale` != 1 scales every
    microbatch's loss (the parity check's break on purpose)."""
    _no_tf32()
    from megatron_opd.trainer import trainer as trainer_module
    from tests.helpers import trainer_runs

    if loss_scale != 1.0:
        base = trainer_module.Trainer

        class ScaledLossTrainer(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                make_loss = self.algorithm.microbatch_loss

                def scaled(responses):
                    def loss(*a, **k):
                        value, tokens, metrics = make_loss(responses)(*a, **k)
                        return value * loss_scale, tokens, metrics
                    return loss

                self.algorithm.microbatch_loss = scaled

        trainer_module.Trainer = ScaledLossTrainer
    return trainer_runs.train_on_rank(argv, steps, weights=weights)


# ============================================================================ in the parent

def check_moe_ep(ep1: list[dict], ep2: list[dict], report: Report) -> None:
    reference, other = ep1[0]["logits"], ep2[0]["logits"]
    diff = float((other - reference).abs().max() / reference.std())
    report.check(diff <= MOE_EP_TOL, "moe_ep2_parity", f"{ep2[0]['spec']}, {ep2[0]['dispatcher']} dispatcher, fp32: "
                 f"EP=2 vs EP=1 logits max |diff| / std {diff:.3g} (tolerance {MOE_EP_TOL:g}), "
                 f"{tuple(reference.shape)}")



def make_qwen_model(directory: Path, fields: dict, seed: int = 0) -> Path:
    """A random Qwen2 model (tests.hf_models.randomize, embedding rescaled) saved in bf16."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tests.hf_models import randomize

    config = Qwen2Config(**fields)
    config.architectures = ["Qwen2ForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    with torch.no_grad():  # tied head: logits ~ RMS-normed hidden (|h| ~ sqrt(H)) . embedding row
        embedding = model.get_input_embeddings().weight
        embedding.mul_(LOGIT_STD / math.sqrt(fields["hidden_size"]))
    model.to(torch.bfloat16).save_pretrained(directory)
    return Path(directory)


def make_qwen3_moe_model(directory: Path, fields: dict, seed: int = 0) -> Path:
    """A random Qwen3-MoE model (tests.hf_models.randomize, untied head rescaled) saved in bf16."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from tests.hf_models import randomize

    config = Qwen3MoeConfig(**fields)
    config.architectures = ["Qwen3MoeForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    with torch.no_grad():  # logits ~ RMS-normed hidden (|h| ~ sqrt(H)) . head row (randomize's std 1/sqrt(H))
        head = model.get_output_embeddings().weight
        head.mul_(LOGIT_STD / (float(head.std()) * math.sqrt(fields["hidden_size"])))
    model.to(torch.bfloat16).save_pretrained(directory)
    return Path(directory)


def _fmt(d: dict) -> str:
    return (f"max {d['max']:.3g} mean {d['mean']:.3g} token-q90 {d['token_q90']:.3g} q99 {d['token_q99']:.3g} "
            f"argmax-agree {d['argmax_agree']:.3f}; {d['tokens_over']} of {d['tokens']} tokens above {LOGITS_TOL['max']:g}")


def _tol(tol: dict) -> str:
    return " ".join(f"{key.replace('_', '-')} {value:g}" for key, value in tol.items())


def check_logits(r: dict, report: Report, name: str = "te_logits_vs_hf", tol: dict = LOGITS_TOL,
                 caught_by: tuple[str, ...] = ("max", "mean")) -> None:
    """PASS within every `tol`; the control must exceed the tolerances named in `caught_by`."""
    report.add("INFO", f"{name} setup", f"{r['device']}, {r['spec']}, load {r['load_s']:.1f}s, tokens "
               f"{r['tokens'][0]}x{r['tokens'][1]}, reference logits std {r['ref_std']:.2f} max |.| "
               f"{r['ref_absmax']:.1f}; layer-{r['layer']} names: {', '.join(r['names'])}")
    report.add("INFO", f"{name} hf_bf16", f"HF bf16 vs HF fp32, / std: {_fmt(r['hf_bf16'])}; Megatron's "
               f"mean error is {r['megatron']['mean'] / max(r['hf_bf16']['mean'], 1e-30):.2f}x HF bf16's")
    m, c = r["megatron"], r["control"]
    report.check(all(m[key] <= value for key, value in tol.items()), name,
                 f"Megatron bf16 vs HF fp32, / std: {_fmt(m)} (tolerance {_tol(tol)})")
    report.check(all(c[key] > tol[key] for key in caught_by), f"{name} control",
                 f"{r['control_what']}: {_fmt(c)} (must exceed the {', '.join(caught_by)} tolerance)")


def _safetensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def check_convert(results: list[dict], hf_dir: Path, work: Path, tp: int, report: Report) -> None:
    r = results[0]
    report.add("INFO", "convert_round_trip setup", f"TP={tp}, {r['spec']}, hf_to_megatron {r['hf_to_megatron_s']:.1f}s, "
               f"megatron_to_hf {r['megatron_to_hf_s']:.1f}s; layer-0 parameter names: "
               f"{', '.join(n.split('.layers.0.')[1] for n in r['names'])}")
    source, back = _safetensors(hf_dir), _safetensors(work / "hf_back")
    differ = [name for name in source if name not in back or back[name].dtype != source[name].dtype
              or not torch_equal(back[name], source[name])]
    extra = sorted(set(back) - set(source))
    report.check(not differ and not extra and bool(source), "convert_round_trip safetensors",
                 f"{len(source)} tensors ({sum(t.numel() for t in source.values()) / 1e6:.1f}M values, "
                 f"{next(iter(source.values())).dtype}): {len(differ)} differ or missing"
                 + (f" ({differ[:3]})" if differ else "") + f", {len(extra)} extra" + (f" ({extra[:3]})" if extra else ""))
    unequal = sorted({n for r in results for n in r["unequal"]} | {n for r in results for n in r["missing"]})
    report.check(not unequal, "convert_round_trip load_megatron",
                 f"load_pretrained(Megatron checkpoint) vs load_pretrained(HF), {r['params']} full tensors: "
                 f"{len(unequal)} not bit-equal" + (f" ({unequal[:3]})" if unequal else ""))
    keys = r["checkpoint_keys"]
    te_names = [k for k in keys if k.endswith(("linear_qkv.layer_norm_weight", "linear_fc1.layer_norm_weight"))]
    local_names = [k for k in keys if "input_layernorm" in k or "pre_mlp_layernorm" in k]
    report.check(len(te_names) >= 2 and not local_names, "convert_round_trip te_names",
                 f"{len(keys)} dist-checkpoint keys; TE-named norms: {te_names[:2]}; local-named: {local_names[:2]}")


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a, b)


def check_kernel(r: dict, report: Report) -> None:
    shape = r["shape"]

    def cost(d: dict) -> str:
        memory = f", peak {d['peak_bytes'] / 2**30:.2f} GiB" if "peak_bytes" in d else ""
        return f"{d['seconds'] * 1e3:.0f} ms{memory}"

    report.add("INFO", "kernel_vs_eager cost", f"{r['device']}, {shape['tokens']} x {shape['vocab']} bf16, hidden "
               f"{shape['student_hidden']}/{shape['teacher_hidden']}, fwd+bwd: kernel {cost(r['kernel'])}; eager "
               f"{cost(r['eager'])}")
    ok = r["loss_rel"] <= KERNEL_TOL["loss"]
    report.check(ok, "kernel_vs_eager loss", f"kernel {r['kernel']['loss']:.6f} vs eager {r['eager']['loss']:.6f}: "
                 f"relative {r['loss_rel']:.3g} (tolerance {KERNEL_TOL['loss']:g})")
    ok = max(r["grad_hidden_rel"], r["grad_head_rel"]) <= KERNEL_TOL["grad"]
    report.check(ok, "kernel_vs_eager grads", f"max |diff| / max |eager|: student hidden {r['grad_hidden_rel']:.3g}, "
                 f"LM head {r['grad_head_rel']:.3g} (tolerance {KERNEL_TOL['grad']:g})")


def _logging_rank(results: list[dict]) -> dict:
    return next(r for r in results if r["steps"][0])


def check_parity(tp1: list[dict], tp2: list[dict], report: Report, name: str = "trainer_tp2_parity",
                 labels: tuple[str, str] = ("TP=1", "TP=2")) -> None:
    """One step's loss and update of `tp2` (labelled `labels[1]`) against `tp1`'s."""
    from tests.helpers.trainer_runs import merged, update_errors

    reference, other = merged(tp1), merged(tp2)
    errors = update_errors(other, reference)
    worst = max(errors, key=errors.get)
    loss1, loss2 = reference["steps"][0]["loss"], other["steps"][0]["loss"]
    report.check(abs(loss1 - loss2) <= PARITY_LOSS_ATOL, f"{name} loss",
                 f"{labels[1]} {loss2:.8f} vs {labels[0]} {loss1:.8f} (tolerance {PARITY_LOSS_ATOL:g})")
    report.check(errors[worst] <= PARITY_RTOL, f"{name} update",
                 f"{len(errors)} tensors, worst {worst}: {errors[worst]:.3g} of its largest update "
                 f"(tolerance {PARITY_RTOL:g}); median {sorted(errors.values())[len(errors) // 2]:.3g}")


def check_bf16(result: dict, tp: int, report: Report) -> None:
    steps = result["steps"]
    losses = [s["loss"] for s in steps]
    norms = [s.get("grad_norm", float("nan")) for s in steps]
    finite = all(math.isfinite(x) for x in losses + norms) and len(steps) == BF16_STEPS
    report.check(finite, "bf16_gkd_steps finite", f"{len(steps)} steps at TP={tp}: losses {losses[0]:.4f} .. "
                 f"{losses[-1]:.4f}, grad norms {min(norms):.3g} .. {max(norms):.3g}, all finite: {finite}")
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    report.check(last < BF16_DECREASE * first, "bf16_gkd_steps decreasing",
                 f"mean loss of the last 5 {last:.4f} vs the first 5 {first:.4f}: ratio {last / first:.3f} "
                 f"(must be < {BF16_DECREASE})")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of {', '.join(CHECKS)}")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: gloo ranks at tiny sizes, for checking this script without a GPU")
    parser.add_argument("--size", choices=("tiny", "full"),
                        help="model and kernel sizes (default: tiny with --device cpu, full with cuda)")
    parser.add_argument("--transformer-impl", choices=("auto", "local"), default="auto",
                        help="auto: TE on CUDA when installed, else the local spec")
    parser.add_argument("--break-on-purpose", action="store_true",
                        help="break each check's candidate in a known way: every check must FAIL")
    add_run_arguments(parser, timeout=300.0, budget=240.0, unit="check", kept="models and checkpoints")
    args = parser.parse_args(argv)
    report = Report()
    names = selected(parser, args.checks, CHECKS, "check")
    size = args.size or ("tiny" if args.device == "cpu" else "full")
    tiny = size == "tiny"

    found = preflight(args.device, report, COMMON_MODULES, "tests.helpers.trainer_runs")
    if any(status == "MISSING" for status, _, _ in report.lines):
        print("gpu_train_check: cannot run (see MISSING above); nothing was checked", flush=True)
        return 2
    report.add("INFO", "versions", ", ".join(f"{k} {v}" for k, v in found.items()) + f"; sizes: {size}"
               + ("; BREAK ON PURPOSE: every check should FAIL" if args.break_on_purpose else ""))

    from megatron_opd.testing import run_distributed
    from megatron_opd.testing.multiprocess import DistributedTestError
    from tests.gkd_setup import make_gkd_setup, overrides
    from tests.helpers.trainer_runs import SGD

    gpus = found["gpus"] if args.device == "cuda" else None
    env = {"MEGATRON_OPD_DEVICE": args.device}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    sabotage = args.break_on_purpose
    root = Path(tempfile.mkdtemp(prefix="gpu_train_check_"))
    deadline = time.monotonic() + args.budget
    cache: dict = {}

    def qwen_model() -> Path:
        if "qwen" not in cache:
            started = time.monotonic()
            cache["qwen"] = make_qwen_model(root / "qwen", QWEN_TINY if tiny else QWEN_05B)
            report.add("INFO", "model", f"random Qwen2 {'tiny' if tiny else '0.5B-shaped'} written in "
                       f"{time.monotonic() - started:.1f}s to {cache['qwen']}")
        return cache["qwen"]

    def qwen3_moe_model() -> Path:
        if "moe" not in cache:
            started = time.monotonic()
            cache["moe"] = make_qwen3_moe_model(root / "qwen3_moe", QWEN3_MOE_TINY if tiny else QWEN3_MOE_FULL)
            report.add("INFO", "moe model", f"random Qwen3-MoE {'tiny' if tiny else '30B-A3B-layer-shaped'} "
                       f"written in {time.monotonic() - started:.1f}s to {cache['moe']}")
        return cache["moe"]

    def gkd_setup() -> dict:
        if "gkd" not in cache:
            cache["gkd"] = make_gkd_setup(root / "gkd", student_family="qwen2", teacher_family="llama2",
                                          student_fields=STUDENT, teacher_fields=TEACHER)
        return cache["gkd"]

    def ranks(fn, world, *fn_args):
        return run_distributed(fn, world, *fn_args, timeout=args.timeout, env=env)

    skipped = []
    for name in names:
        two = args.device == "cpu" or gpus >= 2
        reason = None
        if name == "trainer_tp2_parity" and not two:
            reason = f"needs 2 GPUs for TP=2 over NCCL, {gpus} here"
        elif name == "moe_ep2_parity" and not two:
            reason = f"needs 2 GPUs for EP=2 (alltoall dispatcher) over NCCL, {gpus} here"
        elif time.monotonic() > deadline:
            reason = f"--budget {args.budget:.0f}s spent"
        if reason:
            report.add("SKIP", name, reason)
            skipped.append(name)
            continue
        started = time.monotonic()
        print(f"--- {name}", flush=True)
        try:
            if name == "te_logits_vs_hf":
                (result,) = ranks(logits_on_rank, 1, str(qwen_model()), LOGITS_SHAPE[size], args.transformer_impl,
                                  sabotage)
                check_logits(result, report)
            elif name == "te_moe_logits_vs_hf":
                (result,) = ranks(logits_on_rank, 1, str(qwen3_moe_model()), LOGITS_SHAPE[size],
                                  args.transformer_impl, sabotage, "expert_swap")
                check_logits(result, report, name, MOE_TOL, caught_by=("token_q90",))
            elif name == "moe_ep2_parity":
                shape = LOGITS_SHAPE[size]
                ep1 = ranks(moe_ep_logits_on_rank, 1, str(qwen3_moe_model()), shape, args.transformer_impl, 1, False)
                ep2 = ranks(moe_ep_logits_on_rank, 2, str(qwen3_moe_model()), shape, args.transformer_impl, 2,
                            sabotage)
                check_moe_ep(ep1, ep2, report)
            elif name == "convert_round_trip":
                tp = 2 if two else 1
                work = root / "convert"
                work.mkdir()
                results = ranks(convert_on_rank, tp, str(qwen_model()), str(work), tp, args.transformer_impl,
                                sabotage)
                check_convert(results, qwen_model(), work, tp, report)
            elif name == "kernel_vs_eager":
                (result,) = ranks(kernel_on_rank, 1, KERNEL_SHAPE[size], sabotage)
                check_kernel(result, report)
            elif name == "trainer_tp2_parity":
                setup = gkd_setup()
                fields = {**SGD, "training.micro_batch_size": 2, "training.train_iters": 1}
                tp1 = ranks(train_on_rank, 1, overrides(setup, root / "tp1", **fields), 1, True, 1.0)
                tp2 = ranks(train_on_rank, 2, overrides(setup, root / "tp2", **fields,
                                                        **{"parallel.tensor_model_parallel_size": 2}),
                            1, True, 1.001 if sabotage else 1.0)
                check_parity(tp1, tp2, report)
            elif name == "packed_thd_parity":  # packed rows: THD PackedSeqParams under TE, masks on the local spec
                setup = gkd_setup()
                fields = {**SGD, "training.micro_batch_size": 2, "training.train_iters": 1}
                rows = ranks(train_on_rank, 1, overrides(setup, root / "rows", **fields), 1, True, 1.0)
                packed = ranks(train_on_rank, 1, overrides(setup, root / "packed", **fields,
                                                           **{"training.max_tokens_per_microbatch": 64,
                                                              "training.pack_sequences": True}),
                               1, True, 1.001 if sabotage else 1.0)
                check_parity(rows, packed, report, name, ("fixed rows", "packed rows"))
            elif name == "bf16_gkd_steps":
                tp = 2 if two else 1
                fields = {"beta": BF16_BETA, "optimizer.optimizer": "adam", "optimizer.lr": 1e-9 if sabotage else BF16_LR,
                          "optimizer.clip_grad": 1.0, "optimizer.lr_decay_style": "constant",
                          "training.precision": "bf16", "training.train_iters": BF16_STEPS,
                          "training.micro_batch_size": 4, "parallel.tensor_model_parallel_size": tp}
                results = ranks(train_on_rank, tp, overrides(gkd_setup(), root / "bf16", **fields), BF16_STEPS,
                                False, 1.0)
                check_bf16(_logging_rank(results), tp, report)
        except DistributedTestError as error:
            report.rank_failure(name, error)
        except Exception as error:  # noqa: BLE001
            report.evaluation_failure(name, error)
        report.add("INFO", f"{name} wall", f"{time.monotonic() - started:.1f}s")

    return report.finish("gpu_train_check", skipped, "check(s)", args.json, root, args.keep)


if __name__ == "__main__":  # run_distributed starts processes that re-import this file
    sys.exit(main())
