"""What the divergence kernel sends between TP ranks: O(1) floats per token, never the vocab.

Wraps torch.distributed's collectives on each rank and counts calls and elements,
separately for forward and backward.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_opd.testing import run_distributed

TOKENS, VOCAB, TP = 64, 4096, 2


def count_collectives(topk, beta) -> dict:
    from megatron_opd.config import ParallelConfig
    from megatron_opd.ops import vocab_parallel_divergence
    from megatron_opd.runtime import initialize_runtime

    initialize_runtime(ParallelConfig(tensor_model_parallel_size=TP))
    log = []
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor",
                                                        "reduce_scatter_tensor", "broadcast")}

    def wrap(name):
        def counted(tensor_or_list, *args, **kwargs):
            first = tensor_or_list
            numel = first.numel() if torch.is_tensor(first) else sum(t.numel() for t in first)
            if name == "all_gather":  # (output list, input)
                numel = args[0].numel()
            log.append((name, numel))
            return originals[name](tensor_or_list, *args, **kwargs)
        return counted

    for name in originals:
        setattr(dist, name, wrap(name))
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(TOKENS, VOCAB // TP, generator=generator).requires_grad_()
    teacher = torch.randn(TOKENS, VOCAB // TP, generator=generator)
    loss = vocab_parallel_divergence(student, teacher, beta=beta, topk=topk, chunk_size=16)
    forward = list(log)
    log.clear()
    loss.backward()
    return {"forward": forward, "backward": list(log)}


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_full_vocab_sends_six_floats_per_token_in_three_calls(beta):
    rank0, _ = run_distributed(count_collectives, TP, None, beta)
    assert [name for name, _ in rank0["forward"]] == ["all_reduce"] * 3
    floats_per_token = sum(numel for _, numel in rank0["forward"]) / TOKENS
    assert floats_per_token == 6  # (max, sum-exp, KL partial) x (student, teacher)
    assert rank0["backward"] == []  # the backward is local on every rank


def test_topk_sends_order_k_per_token():
    k = 8
    rank0, _ = run_distributed(count_collectives, TP, k, 0.5)
    calls = rank0["forward"]
    assert len(calls) <= 3 and rank0["backward"] == []
    per_token = sum(numel for _, numel in calls) / TOKENS
    assert per_token <= 4 * k  # values + ids gathered, student logits at the K ids
    assert max(numel for _, numel in calls) / TOKENS < VOCAB / 100
