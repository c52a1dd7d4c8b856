"""Sequence packing (`pipeline.packing`) against the same examples unpacked, one per row.

Several examples share a row with a block-diagonal causal mask and positions restarting at each
example (Megatron's local layer spec, CPU). The summed next-token CE over every example's counted
tokens and every parameter's gradient must equal the unpacked run's (fp32, reduction-order
tolerance). Both runs go through `pipeline.run_microbatches` (Megatron's schedule).
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.pipeline.packing import pack_examples, pack_rows
from megatron_opd.pipeline.segments import packed_inputs
from megatron_opd.testing import run_distributed
from tests.tiny_models import GQA_QKNORM, reference_state_dict, relative_error


def examples_of(lengths: list[int], seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        prompt = int(torch.randint(1, length, (1,), generator=generator))
        examples.append({"input_ids": torch.randint(1, GQA_QKNORM.vocab_size, (length,), generator=generator).tolist(),
                         "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return examples


def ce_step_on_rank(parallel, lengths: list[int], row_length: int, packed: bool, sabotage: str = "",
                    block_tokens: int = 0) -> dict:
    """Summed CE and the full gradients of one forward-backward over `lengths`' examples.
    `block_tokens`: one packed row per microbatch (as the trainer packs), attended block by block
    (`SDPAttention`, blocks of at most this many positions); the blocks each call made are returned."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_opd.data import collate
    from megatron_opd.models import build_gpt_model, gather_full_tensors, load_full_state_dict
    from megatron_opd.models.outputs import head_input, lm_head_weight
    from megatron_opd.pipeline import Microbatch, run_microbatches
    from megatron_opd.runtime import initialize_runtime

    runtime = initialize_runtime(parallel)
    model = build_gpt_model(GQA_QKNORM, runtime)
    load_full_state_dict(model, reference_state_dict(GQA_QKNORM))
    model.config.calculate_per_token_loss = True  # losses are sums: no division by microbatches
    examples = examples_of(lengths)
    blocks = []
    if packed:
        rows = pack_rows([len(example["input_ids"]) for example in examples], row_length)
        microbatches = [pack_examples(examples, rows, pad_id=0)]
        if block_tokens:
            from megatron_opd.models import sdpa_attention

            microbatches = [pack_examples(examples, [row], pad_id=0) for row in rows]
            sdpa_attention.PACKED_BLOCK_TOKENS = block_tokens
            real_blocks = sdpa_attention._blocks
            sdpa_attention._blocks = lambda *args: blocks.append(real_blocks(*args)) or blocks[-1]
        if sabotage:
            import megatron_opd.pipeline.schedule as schedule

            real = schedule.packed_inputs
            schedule.packed_inputs = {
                "no_mask": lambda segments: (real(segments)[0], None),
                "no_positions": lambda segments: (torch.arange(segments.shape[1]).expand_as(segments),
                                                  real(segments)[1]),
            }[sabotage]
    else:
        microbatches = []
        for index, example in enumerate(examples):
            batch = collate([example], 0, pad_to_multiple_of=8)
            microbatches.append(Microbatch(batch["tokens"], batch["loss_mask"].bool(), (index,)))

    def loss(index, batch, hidden):
        logits = head_input(model, hidden) @ lm_head_weight(model).t()  # [b, s, V/tp]
        logits = gather_from_tensor_model_parallel_region(logits)[..., :GQA_QKNORM.vocab_size].float()
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none")
        value = (per_token * batch.loss_mask.flatten()).sum()
        count = batch.loss_mask.sum().to(torch.int)
        return value, count, {"loss": value.detach().clone(), "rows": torch.tensor(batch.tokens.shape[0])}

    outputs = run_microbatches(model, microbatches, loss, forward_only=False)
    return {"loss": sum(float(out["loss"]) for out in outputs), "rows": sum(int(out["rows"]) for out in outputs),
            "blocks": blocks,
            "grads": {name: grad.clone() for name, grad in gather_full_tensors(model, lambda param: param.grad)}}


LENGTHS = [5, 23, 9, 14, 31, 7, 18, 3, 12]


def run(world: int, packed: bool, sabotage: str = "", row_length: int = 32, block_tokens: int = 0) -> dict:
    from megatron_opd.config import ParallelConfig

    return run_distributed(ce_step_on_rank, world, ParallelConfig(), LENGTHS, row_length, packed, sabotage,
                           block_tokens, timeout=300)[0]


def test_packed_inputs_positions_and_mask():
    segments = torch.tensor([[1, 1, 1, 2, 2, 0, 0, 0]])
    positions, mask = packed_inputs(segments)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    allowed = ~mask[0, 0]
    for query in range(8):
        for key in range(8):
            assert allowed[query, key] == (segments[0, query] == segments[0, key] and key <= query)


def test_thd_params_and_positions_follow_the_spans():
    """What the THD path gives Transformer Engine (no mask): positions restarting at each example
    and one sequence per example (the padding tail its own), read off the packed row's spans."""
    from megatron_opd.pipeline.segments import packed_positions, thd_packed_seq_params

    examples = examples_of([5, 9, 3])
    batch = pack_examples(examples, [[0, 1, 2]], pad_id=0, seq_length=24)
    spans = batch.example_spans()
    width = batch.input_ids.shape[1]
    want_positions = [0] * width
    for _, start, length in spans:
        want_positions[start:start + length] = range(length)
    tail = spans[-1][1] + spans[-1][2]
    want_positions[tail:] = range(width - tail)
    assert packed_positions(batch.segments).tolist() == [want_positions]
    assert packed_inputs(batch.segments)[0].tolist() == [want_positions]
    params = thd_packed_seq_params(batch.segments)
    bounds = [start for _, start, _ in spans] + ([tail] if tail < width else []) + [width]
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == bounds
    assert params.max_seqlen_q == max(b - a for a, b in zip(bounds, bounds[1:]))


def test_pack_rows_fits_and_covers():
    lengths = [5, 23, 9, 14, 31, 7, 18, 3, 12, 40]
    rows = pack_rows(lengths, 32)
    assert sorted(index for row in rows for index in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 32 or len(row) == 1 for row in rows)


@pytest.fixture(scope="module")
def unpacked() -> dict:
    return run(1, packed=False)


def test_packed_step_equals_unpacked(unpacked):
    packed = run(1, packed=True)
    assert packed["rows"] < unpacked["rows"] == len(LENGTHS)  # rows really hold several examples
    assert packed["loss"] == pytest.approx(unpacked["loss"], rel=1e-5)
    for name, grad in unpacked["grads"].items():
        assert relative_error(packed["grads"][name], grad) < 5e-5, name  # measured <= 2e-6


def test_packed_rows_attended_block_by_block_equal_unpacked(unpacked):
    """The trainer's packing (one row per microbatch) through `SDPAttention`'s blocks: rows of up to
    64 positions in blocks of at most 16 (and longer examples alone) give the unpacked step."""
    packed = run(1, packed=True, row_length=64, block_tokens=16)
    layers = GQA_QKNORM.num_layers
    assert len(packed["blocks"]) == layers * packed["rows"]  # every attention call took the blocks
    # several blocks per row, and blocks holding several examples: both cases ran
    assert any(len(blocks) > 1 for blocks in packed["blocks"])
    assert any(not single for blocks in packed["blocks"] for _, _, single in blocks)
    assert packed["loss"] == pytest.approx(unpacked["loss"], rel=1e-5)
    for name, grad in unpacked["grads"].items():
        assert relative_error(packed["grads"][name], grad) < 5e-5, name


@pytest.mark.slow
@pytest.mark.parametrize("sabotage", ["no_mask", "no_positions"])
def test_packing_without_its_mask_differs(unpacked, sabotage):
    """Controls: attention across examples must show (or the test above could not fail). Positions
    that do not restart change nothing under RoPE (relative), so that control must pass equal."""
    packed = run(1, packed=True, sabotage=sabotage)
    if sabotage == "no_mask":
        assert packed["loss"] != pytest.approx(unpacked["loss"], rel=1e-3)
    else:
        assert packed["loss"] == pytest.approx(unpacked["loss"], rel=1e-5)
