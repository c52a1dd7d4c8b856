"""Train a tiny Megatron GPT for a few steps on any TP/PP layout and print a summary.

The interim CPU quickstart (`make quickstart`): real Megatron-Core code end to end
(parallel state, GPTModel, pipeline schedule, DDP, grad finalization, optimizer)
on gloo ranks, on a synthetic task whose loss visibly falls: each sequence is an
arithmetic progression modulo the vocabulary, so every token after the second is
determined by the two before it.

    torchrun --standalone --nproc-per-node 2 tools/smoke_train.py --tp 2
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_opd.config import ModelConfig, ParallelConfig
from megatron_opd.models import build_gpt_model
from megatron_opd.runtime import destroy_runtime, initialize_runtime
from megatron_opd.trainer import lm_forward_backward


def progression_batches(vocab: int, num_microbatches: int, micro_batch_size: int, seq_length: int,
                        generator: torch.Generator) -> torch.Tensor:
    """`[m, b, seq_length + 1]` token ids: start + stride * i (mod vocab), stride in 1..7."""
    shape = (num_microbatches, micro_batch_size, 1)
    start = torch.randint(0, vocab, shape, generator=generator)
    stride = torch.randint(1, 8, shape, generator=generator)
    return (start + stride * torch.arange(seq_length + 1)) % vocab


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--num-microbatches", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    runtime = initialize_runtime(ParallelConfig(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        sequence_parallel=args.sequence_parallel, seed=args.seed))
    model_config = ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=256, vocab_size=128, make_vocab_size_divisible_by=64,
                               max_position_embeddings=args.seq_length)
    model = build_gpt_model(model_config, runtime)
    model = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.0, clip_grad=1.0), [model])
    local_params = sum(p.numel() for p in model.parameters())

    # Every model-parallel rank must see the same batch: same seed on all ranks, one
    # different stream per data-parallel rank.
    generator = torch.Generator().manual_seed(args.seed + parallel_state.get_data_parallel_rank())
    tokens_per_step = args.num_microbatches * args.micro_batch_size * args.seq_length * runtime.data_parallel_size
    is_reporter = runtime.rank == runtime.world_size - 1  # last stage, holds the loss
    history = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        batches = progression_batches(model_config.vocab_size, args.num_microbatches,
                                      args.micro_batch_size, args.seq_length, generator)
        losses = lm_forward_backward(model, batches)
        finalize_model_grads([model])
        _, grad_norm, _ = optimizer.step()
        if losses is not None:
            loss = losses.mean()
            dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            history.append(loss.item() / runtime.data_parallel_size)
            if is_reporter and (step == 1 or step % 5 == 0 or step == args.steps):
                print(f"step {step:3d}/{args.steps}  lm_loss {history[-1]:.4f}  grad_norm {grad_norm:.3f}",
                      flush=True)
    elapsed = time.perf_counter() - start

    params = torch.tensor([float(local_params)], device=runtime.device)  # NCCL needs CUDA tensors
    dist.all_reduce(params)  # replicated params (norms) counted once per rank: an upper bound
    if is_reporter:
        rows = [
            ("layout", f"TP={args.tp} PP={args.pp} DP={runtime.data_parallel_size}"
                       f"{' +SP' if args.sequence_parallel else ''} on {runtime.world_size} "
                       f"{runtime.backend} rank(s), {runtime.device}"),
            ("model", f"{model_config.num_layers} layers, hidden {model_config.hidden_size}, "
                      f"GQA {model_config.num_attention_heads}/{model_config.query_groups}, "
                      f"~{params.item() / 1e6:.2f}M params summed over ranks"),
            ("lm_loss", f"{history[0]:.4f} -> {history[-1]:.4f} (uniform guess {math.log(model_config.vocab_size):.4f})"),
            ("speed", f"{args.steps / elapsed:.2f} steps/s, {tokens_per_step * args.steps / elapsed:,.0f} tokens/s"),
        ]
        width = max(len(name) for name, _ in rows)
        print("\n".join(f"{name:<{width}}  {value}" for name, value in rows), flush=True)
        if not history[-1] < history[0]:
            raise SystemExit("smoke run failed: the loss did not fall")
    destroy_runtime()


if __name__ == "__main__":
    main()
