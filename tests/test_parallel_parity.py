"""TP / PP / SP layouts of real Megatron code give the single-process result.

Every layout loads the same full weights, runs the same two microbatches through
Megatron's pipeline schedule, DDP and `finalize_model_grads`, and must reproduce the
TP=1/PP=1 single-process full-vocab logits, LM losses and the gradient of every
parameter (re-assembled from its shards) within 1e-5 (float32), relative to each tensor's
largest value (`tests.tiny_models.relative_error`): a gradient of 1e-4 is held to 1e-9.
"""

import functools

import pytest

from megatron_opd.config import ParallelConfig
from megatron_opd.testing import run_distributed
from tests.tiny_models import (
    GQA_QKNORM,
    TIED,
    compare,
    merge_ranks,
    reference_state_dict,
    scaled_diff,
    token_batches,
    train_step_on_rank,
)

TOLERANCE = 1e-5
LAYOUTS = {
    "tp2": ParallelConfig(tensor_model_parallel_size=2),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
    "tp2_sp": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
    "tp2_pp2": ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
}
MODELS = {"gqa_qknorm": GQA_QKNORM, "tied": TIED}
CASES = [("gqa_qknorm", layout) for layout in LAYOUTS] + [("tied", "pp2"), ("tied", "tp2_pp2")]


@functools.lru_cache(maxsize=None)
def inputs(model_name: str):
    config = MODELS[model_name]
    return config, reference_state_dict(config), token_batches(config, 2, 2, 16)


@functools.lru_cache(maxsize=None)
def single_process_result(model_name: str) -> dict:
    config, state, tokens = inputs(model_name)
    return merge_ranks(run_distributed(train_step_on_rank, 1, config, ParallelConfig(), state, tokens))


def run_layout(model_name: str, layout: str, sabotage=None) -> list[dict]:
    config, state, tokens = inputs(model_name)
    parallel = LAYOUTS[layout]
    return run_distributed(train_step_on_rank, parallel.model_parallel_size,
                           config, parallel, state, tokens, sabotage=sabotage)


def check_layout(model_name: str, layout: str, sabotage=None) -> None:
    diffs = compare(merge_ranks(run_layout(model_name, layout, sabotage)),
                    single_process_result(model_name))
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOLERANCE, f"{worst} differs by {diffs[worst]:.3g} at {layout}"
    # Every parameter was compared, not only the ones a stage happened to return.
    assert len(diffs) == 2 + len(reference_state_dict(MODELS[model_name]))


@pytest.mark.parametrize("model_name,layout", CASES, ids=[f"{m}-{l}" for m, l in CASES])
def test_layout_matches_single_process(model_name, layout):
    check_layout(model_name, layout)


def test_reference_is_not_degenerate():
    reference = single_process_result("gqa_qknorm")
    assert reference["logits"].std() > 0.5
    assert all(grad.abs().max() > 1e-4 for grad in reference["grads"].values())


def test_parity_check_bites_when_tp_all_reduce_is_skipped():
    with pytest.raises(AssertionError, match="differs by|ranks disagree"):
        check_layout("gqa_qknorm", "tp2", sabotage="skip_tp_all_reduce")
    last_stage = next(r for r in run_layout("gqa_qknorm", "tp2", "skip_tp_all_reduce")
                      if r["logits"] is not None)
    assert scaled_diff(last_stage["logits"], single_process_result("gqa_qknorm")["logits"]) > 1e-2
