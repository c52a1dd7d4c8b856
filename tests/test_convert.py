"""`megatron-opd convert`: round trip, resharding, verify, bad inputs, atomic output.

Conversions run the real CLI entry (`convert.main`) on gloo ranks, as torchrun would;
bad inputs run it in this process, since they must fail before any process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_opd.commands.convert import main as convert_main
from megatron_opd.testing import run_distributed
from tests.hf_models import VOCAB, hf_logits, make_hf_model

REPO = Path(__file__).resolve().parents[1]


def cli_on_rank(argv: list[str]):
    """One rank of `megatron-opd convert ARGV`: the exit code, or the verify result."""
    from megatron_opd.commands import convert

    if argv[0] == "verify":
        args = convert.build_parser().parse_args(argv)
        return convert.verify(args.hf_path, args.megatron_path, args.tp, args.pp, args.seq_length, args.batch_size)
    return convert.main(argv)


def convert(argv: list[str], world_size: int = 1):
    results = run_distributed(cli_on_rank, world_size, [str(a) for a in argv], timeout=300)
    return results[0]


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    """Tied embeddings, QKV bias, a tokenizer: every file kind the round trip must carry."""
    return make_hf_model("qwen2", tmp_path_factory.mktemp("qwen2") / "hf", with_tokenizer=True)


@pytest.fixture(scope="module")
def qwen2_tp2(qwen2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "megatron"
    assert convert(["hf-to-megatron", "--hf-path", qwen2, "--out", out, "--tp", "2"], world_size=2) == 0
    return out


@pytest.mark.parametrize("family", ["qwen2", "llama3.1", "qwen3"])
def test_round_trip_through_tp2_pp2_is_bit_identical(family, tmp_path):
    source = make_hf_model(family, tmp_path / "hf", seed=3, with_tokenizer=True)
    megatron, back = tmp_path / "megatron", tmp_path / "back"
    assert convert(["hf-to-megatron", "--hf-path", source, "--out", megatron, "--tp", 2, "--pp", 2], 4) == 0
    assert convert(["megatron-to-hf", "--megatron-path", megatron, "--out", back, "--tp", 2, "--pp", 2], 4) == 0

    assert_same_tensors(read_safetensors(back), read_safetensors(source))
    assert json.loads((back / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (back / name).read_bytes() == (source / name).read_bytes(), name
    tokens = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(back, tokens), hf_logits(source, tokens))


def test_bf16_and_sharded_output(tmp_path):
    """fp32 HF -> bf16 Megatron -> HF in several safetensors files with an index."""
    from transformers import AutoModelForCausalLM

    source = make_hf_model("llama2", tmp_path / "hf", seed=4)
    megatron, back = tmp_path / "megatron", tmp_path / "back"
    assert convert(["hf-to-megatron", "--hf-path", source, "--out", megatron, "--dtype", "bf16"]) == 0
    assert json.loads((megatron / "megatron_opd_model.json").read_text())["dtype"] == "bf16"
    assert convert(["megatron-to-hf", "--megatron-path", megatron, "--out", back, "--max-shard-size", "64KB"]) == 0

    files = sorted(back.glob("*.safetensors"))
    assert len(files) > 3 and all(f.stat().st_size < 2 * 64 * 1024 for f in files)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in read_safetensors(source).items()}
    assert_same_tensors(read_safetensors(back), expected)
    loaded = AutoModelForCausalLM.from_pretrained(back, dtype=torch.bfloat16)
    assert torch.equal(loaded.model.layers[3].mlp.down_proj.weight,
                       expected["model.layers.3.mlp.down_proj.weight"])


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2), (2, 2)])
def test_checkpoint_written_at_tp2_loads_at_other_layouts(qwen2, qwen2_tp2, tp, pp):
    result = convert(["verify", "--hf-path", qwen2, "--megatron-path", qwen2_tp2, "--tp", tp, "--pp", pp,
                      "--seq-length", 80], world_size=tp * pp)
    assert result.scaled_diff < 1e-4 and result.top1_agreement == 1.0, result


def test_verify_fails_on_another_model(qwen2_tp2, tmp_path):
    other = make_hf_model("qwen2", tmp_path / "other", seed=11)
    argv = ["verify", "--hf-path", other, "--megatron-path", qwen2_tp2, "--seq-length", 16]
    assert run_distributed(convert_main_on_rank, 1, [str(a) for a in argv])[0] == 1


def convert_main_on_rank(argv: list[str]) -> int:
    return convert_main(argv)


# --- bad inputs: a clear message, exit 1 (2 for argparse), the output untouched ---------------

def run_bad(argv: list, capsys) -> tuple[int, str]:
    try:
        code = convert_main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture
def existing_out(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    return out


def assert_untouched(out: Path) -> None:
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith((".out", "out"))) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"


def test_missing_hf_dir(existing_out, capsys, tmp_path):
    code, err = run_bad(["hf-to-megatron", "--hf-path", tmp_path / "nope", "--out", existing_out, "--force"], capsys)
    assert code == 1 and "does not exist" in err and "nope" in err
    assert_untouched(existing_out)


def test_hf_dir_without_weights(existing_out, capsys, tmp_path, qwen2):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((qwen2 / "config.json").read_bytes())
    code, err = run_bad(["hf-to-megatron", "--hf-path", bare, "--out", existing_out, "--force"], capsys)
    assert code == 1 and "model.safetensors" in err and str(bare) in err
    assert_untouched(existing_out)


def test_wrong_dtype_string(existing_out, capsys, qwen2):
    code, err = run_bad(["hf-to-megatron", "--hf-path", qwen2, "--out", existing_out, "--dtype", "float8"], capsys)
    assert code == 2 and "--dtype" in err and "bf16" in err
    assert_untouched(existing_out)


def test_tp_not_dividing_heads(existing_out, capsys, qwen2):
    code, err = run_bad(["hf-to-megatron", "--hf-path", qwen2, "--out", existing_out, "--force", "--tp", 3], capsys)
    assert code == 1 and "num_attention_heads" in err and "tensor_model_parallel_size=3" in err
    assert_untouched(existing_out)


def test_unsupported_architecture(existing_out, capsys, tmp_path, qwen2):
    moe = tmp_path / "moe"
    moe.mkdir()
    config = json.loads((qwen2 / "config.json").read_text())
    # Qwen2-MoE, Qwen3-MoE and Mixtral are supported (tests/test_moe_convert.py); OLMoE is not.
    config.update(model_type="olmoe", architectures=["OlmoeForCausalLM"], num_experts=4)
    (moe / "config.json").write_text(json.dumps(config))
    code, err = run_bad(["hf-to-megatron", "--hf-path", moe, "--out", existing_out, "--force"], capsys)
    assert code == 1 and "olmoe" in err and "Qwen2ForCausalLM" in err
    assert_untouched(existing_out)


def test_non_empty_output_needs_force(existing_out, capsys, qwen2):
    code, err = run_bad(["hf-to-megatron", "--hf-path", qwen2, "--out", existing_out], capsys)
    assert code == 1 and "--force" in err
    assert_untouched(existing_out)


def test_needs_torchrun_for_tp2(existing_out, capsys, qwen2):
    code, err = run_bad(["hf-to-megatron", "--hf-path", qwen2, "--out", existing_out, "--force", "--tp", 2], capsys)
    assert code == 1 and "torchrun --nproc-per-node 2" in err
    assert_untouched(existing_out)


def test_megatron_path_must_be_a_checkpoint(existing_out, capsys, qwen2):
    code, err = run_bad(["megatron-to-hf", "--megatron-path", qwen2, "--out", existing_out, "--force"], capsys)
    assert code == 1 and "expected a megatron_opd checkpoint" in err
    assert_untouched(existing_out)


def test_force_replaces_output(existing_out, qwen2_tp2):
    assert convert(["megatron-to-hf", "--megatron-path", qwen2_tp2, "--out", existing_out, "--force"]) == 0
    assert not (existing_out / "keep.txt").exists() and (existing_out / "model.safetensors").is_file()
    assert [p.name for p in existing_out.parent.iterdir() if p.name.startswith(".")] == []


def test_console_script_exits_non_zero(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "hf-to-megatron",
         "--hf-path", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "MEGATRON_OPD_DEVICE": "cpu"}, timeout=120)
    assert completed.returncode == 1 and "does not exist" in completed.stderr
    assert not (tmp_path / "out").exists()


def test_killed_conversion_leaves_no_checkpoint(qwen2, tmp_path):
    """SIGKILL while the checkpoint is being written: `out` must not appear, and the
    staging directory left behind is not loadable as a checkpoint."""
    from megatron_opd.checkpoint import inspect_pretrained

    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "hf-to-megatron",
         "--hf-path", str(qwen2), "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "MEGATRON_OPD_DEVICE": "cpu"}, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*/hf")) and time.monotonic() < deadline:
        assert process.poll() is None, "conversion ended before it could be killed"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # with its children (dist-checkpointing's Manager)
    process.wait()
    assert not out.exists()
    (staging,) = tmp_path.glob(".out.partial-*")
    with pytest.raises(FileNotFoundError, match="neither an HF model directory"):
        inspect_pretrained(staging)


def logits_with_padding_on_rank(path: str, tp: int, pp: int, pad_vocab_size_to: int, tokens: torch.Tensor):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_opd.checkpoint import load_pretrained
    from megatron_opd.config import ParallelConfig
    from megatron_opd.runtime import initialize_runtime
    from megatron_opd.pipeline import lm_forward_backward

    runtime = initialize_runtime(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    model = load_pretrained(path, runtime, role="teacher", pad_vocab_size_to=pad_vocab_size_to)
    captured = []
    lm_forward_backward(model, tokens[None], forward_only=True, on_logits=lambda logits: captured.append(
        gather_from_tensor_model_parallel_region(logits).detach().clone()))
    keep = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    return captured[0] if keep else None


def assert_logits_with_padding(hf_dir: Path, checkpoint: Path, tp: int, pp: int, padded: int) -> None:
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    results = run_distributed(logits_with_padding_on_rank, tp * pp, str(checkpoint), tp, pp, padded, tokens)
    logits = next(result for result in results if result is not None)
    assert logits.shape[-1] == padded
    expected = hf_logits(hf_dir, tokens[:, :-1])
    assert (logits[..., :VOCAB] - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("tp,padded", [(1, 1000), (2, 768)])
def test_checkpoint_loads_with_another_padded_vocab(qwen2, qwen2_tp2, tp, padded):
    """A teacher padded to its student's vocab: the saved 512 rows are re-padded on load."""
    assert_logits_with_padding(qwen2, qwen2_tp2, tp, 1, padded)


def test_untied_head_repadded_on_the_last_stage(tmp_path):
    source = make_hf_model("llama2", tmp_path / "hf", seed=5)
    assert convert(["hf-to-megatron", "--hf-path", source, "--out", tmp_path / "megatron"]) == 0
    assert_logits_with_padding(source, tmp_path / "megatron", 2, 2, 1024)
