"""`megatron-opd convert` for mixture-of-experts models: round trip bit-exact through
expert-parallel layouts, resharding between EP sizes, `verify` at EP=2, and bad inputs
(an EP size that does not divide the expert count, a checkpoint of another expert count).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_opd.testing import run_distributed
from tests.hf_models import VOCAB, hf_logits
from tests.moe_models import make_moe_hf_model
from tests.test_convert import assert_same_tensors, convert, read_safetensors, run_bad


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory) -> Path:
    return make_moe_hf_model("qwen2_moe", tmp_path_factory.mktemp("qwen2_moe") / "hf", seed=5)


@pytest.fixture(scope="module")
def qwen2_moe_ep2(qwen2_moe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "megatron"
    assert convert(["hf-to-megatron", "--hf-path", qwen2_moe, "--out", out, "--ep", 2], world_size=2) == 0
    return out


@pytest.mark.parametrize("family,to_megatron,to_hf", [
    ("qwen2_moe", (["--ep", 2], 2), (["--tp", 2], 2)),
    pytest.param("mixtral", (["--tp", 2, "--ep", 2], 4), (["--ep", 4, "--etp", 1], 4), marks=pytest.mark.slow),
    ("qwen3_moe", (["--ep", 2, "--etp", 1, "--tp", 2], 2), ([], 1)),
], ids=["ep2-to-tp2", "tp2ep2-to-ep4", "tp2ep2etp1-to-1"])
def test_round_trip_through_expert_parallel_is_bit_identical(family, to_megatron, to_hf, tmp_path):
    source = make_moe_hf_model(family, tmp_path / "hf", seed=3)
    megatron, back = tmp_path / "megatron", tmp_path / "back"
    assert convert(["hf-to-megatron", "--hf-path", source, "--out", megatron, *to_megatron[0]], to_megatron[1]) == 0
    assert convert(["megatron-to-hf", "--megatron-path", megatron, "--out", back, *to_hf[0]], to_hf[1]) == 0
    assert_same_tensors(read_safetensors(back), read_safetensors(source))
    assert json.loads((back / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(back, tokens), hf_logits(source, tokens))


def verify_on_rank(argv: list[str]):
    from megatron_opd.commands import convert

    args = convert.build_parser().parse_args(argv)
    return convert.verify(args.hf_path, args.megatron_path, args.tp, args.pp, args.seq_length, args.batch_size,
                          ep=args.ep, etp=args.etp)


def test_verify_at_ep2(qwen2_moe, qwen2_moe_ep2):
    argv = ["verify", "--hf-path", qwen2_moe, "--megatron-path", qwen2_moe_ep2, "--ep", 2, "--seq-length", 40]
    result = run_distributed(verify_on_rank, 2, [str(a) for a in argv], timeout=300)[0]
    assert result.scaled_diff < 1e-4 and result.top1_agreement == 1.0


def test_ep_not_dividing_experts(tmp_path, capsys, qwen2_moe):
    code, err = run_bad(["hf-to-megatron", "--hf-path", qwen2_moe, "--out", tmp_path / "out", "--ep", 3], capsys)
    assert code == 1 and "parallel.expert_model_parallel_size=3" in err and "num_experts=8" in err
    assert not (tmp_path / "out").exists()


def test_ep_needs_its_processes(tmp_path, capsys, qwen2_moe):
    code, err = run_bad(["hf-to-megatron", "--hf-path", qwen2_moe, "--out", tmp_path / "out", "--ep", 2], capsys)
    assert code == 1 and "torchrun --nproc-per-node 2" in err


def load_into_other_expert_count_on_rank(path: str, hf_dir: str) -> str:
    """Load the checkpoint into a model built from `hf_dir` (another expert count): the error."""
    from megatron_opd.checkpoint import load_model_checkpoint
    from megatron_opd.config import ParallelConfig
    from megatron_opd.models.builder import build_gpt_model
    from megatron_opd.models.hf_config import model_config_from_hf
    from megatron_opd.runtime import initialize_runtime

    runtime = initialize_runtime(ParallelConfig())
    model = build_gpt_model(model_config_from_hf(hf_dir), runtime, initialize=False)
    try:
        load_model_checkpoint(model, path)
    except Exception as error:  # noqa: BLE001 - the message is the result
        return f"{type(error).__name__}: {error}"
    return "loaded"


def test_checkpoint_of_another_expert_count_is_refused(qwen2_moe_ep2, tmp_path):
    other = make_moe_hf_model("qwen2_moe", tmp_path / "hf4", seed=1, num_experts=4)
    message = run_distributed(load_into_other_expert_count_on_rank, 1, str(qwen2_moe_ep2), str(other))[0]
    assert message.startswith("CheckpointMismatchError") and "num_experts 8 vs 4" in message, message
