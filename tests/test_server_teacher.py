"""Training against a teacher over the network (`megatron-opd serve-teacher` on localhost), and the
teacher cache, each compared with the same teacher loaded in process.

The reference is the in-process teacher's renormalized top-K path (`fused_linear_divergence`
with `topk`), itself tested against float64 dense math; the server path goes through HTTP,
vLLM's answer format, the parser, the TP broadcast and `fused_linear_sparse_divergence`.
The fault tests run the real `python -m megatron_opd.train` against a server that is
down, or killed mid-run and restarted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_opd.serve.launch import launch, start_server
from megatron_opd.testing import DistributedTestError, run_distributed
from tests.gkd_setup import overrides
from tests.helpers.teacher_runs import (
    SERVER_ENV,
    K,
    assert_same_cache,
    cache_argv,
    cache_on_rank,
    served,
    served_teacher_setup,
)
from tests.helpers.trainer_runs import assert_same_update, merged, run
from tests.hf_models import VOCAB

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return served_teacher_setup(tmp_path_factory.mktemp("server_teacher"))


@pytest.fixture(scope="module")
def server(setup):
    with start_server(setup["served_teacher"], max_logprobs=8, env=SERVER_ENV,
                      args=["--tokenizer", setup["tokenizer"]]) as server:
        yield server


LAYOUTS = {"tp1": {"world": 1}, "tp2": {"world": 2, "parallel.tensor_model_parallel_size": 2},
           "dp2": {"world": 2},
           # several examples per row: each is sent to the server as its own sequence
           "packed": {"world": 1, "training.max_tokens_per_microbatch": 64, "training.pack_sequences": True}}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gkd_with_the_server_equals_the_local_teacher(setup, server, tmp_path, layout):
    fields = dict(LAYOUTS[layout])
    world = fields.pop("world")
    local = merged(run(setup, tmp_path / "local", world=world, gkd_logits_topk=K, **fields))
    remote = merged(run(setup, tmp_path / "remote", world=world, **served(server.url, **fields)))
    assert remote["steps"][0]["tokens"] == local["steps"][0]["tokens"]
    assert remote["steps"][0]["loss"] == pytest.approx(local["steps"][0]["loss"], rel=1e-5)
    assert local["steps"][0]["loss"] > 0.05
    assert_same_update(remote, local, 1e-5)  # same layout, another teacher path: measured ~1e-6


def test_opd_rl_with_the_server_equals_the_local_teacher(setup, server, tmp_path):
    opd_rl = {"algorithm": "opd_rl", "num_generations": 2, "max_completion_length": 4, "temperature": 1.0,
              "teacher_kl_coef": 0.5, "training.eval_interval": 0}
    local = merged(run(setup, tmp_path / "local", **opd_rl))
    remote = merged(run(setup, tmp_path / "remote", **served(server.url, **opd_rl)))
    for key in ("tokens", "sample_length"):
        assert remote["steps"][0][key] == local["steps"][0][key]
    for key in ("loss", "teacher_kl", "advantage"):
        assert remote["steps"][0][key] == pytest.approx(local["steps"][0][key], rel=1e-5, abs=1e-7), key
    assert_same_update(remote, local, 1e-5)  # same layout, another teacher path: measured ~1e-6


def test_tokenizer_check_passes_for_the_same_tokenizer_and_fails_for_another(setup, server, tmp_path):
    run(setup, tmp_path / "same", **served(server.url, **{"teacher_server.verify_tokenizer": "true"}))
    other = tmp_path / "other_tokenizer"
    make_permuted_tokenizer(other)
    with start_server(setup["served_teacher"], max_logprobs=8, env=SERVER_ENV, args=["--tokenizer", str(other)]) as bad:
        with pytest.raises(DistributedTestError, match=r"tokenizes a probe text .* into other ids than the "
                                                       r"student's tokenizer"):
            run(setup, tmp_path / "other", **served(bad.url, **{"teacher_server.verify_tokenizer": "true"}))


def make_permuted_tokenizer(directory: Path) -> None:
    """The test tokenizer's words with other ids: the same vocab size, another tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": (i * 7) % (VOCAB - 1) for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="w0",
                            pad_token="<unk>").save_pretrained(directory)


def test_more_logprobs_than_the_server_gives_is_refused(setup, server, tmp_path):
    with pytest.raises(DistributedTestError, match=r"returns at most 8 logprobs, fewer than gkd_logits_topk=9"):
        run(setup, tmp_path, **served(server.url, gkd_logits_topk=9))


# ----------------------------------------------------------------------------- the cache

@pytest.fixture(scope="module")
def local_cache(setup, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    out = root / "local_cache"
    assert run_distributed(cache_on_rank, 1, cache_argv(setup, out, root), timeout=300) == [0]
    return out


def test_training_from_the_cache_equals_the_live_teacher(setup, local_cache, tmp_path):
    """Written once with K=8 at TP=1; trained from at TP=2 with K=5, against the live teacher's top-5."""
    tp2 = {"parallel.tensor_model_parallel_size": 2}
    live = merged(run(setup, tmp_path / "live", world=2, gkd_logits_topk=K, **tp2))
    cached = merged(run(setup, tmp_path / "cached", world=2, teacher_model="null", teacher_cache=str(local_cache),
                        gkd_logits_topk=K, **tp2))
    assert cached["steps"][0]["loss"] == pytest.approx(live["steps"][0]["loss"], rel=1e-5)
    assert_same_update(cached, live, 1e-5)  # measured ~1e-6


def test_cache_written_at_tp2_and_from_the_server_equals_tp1(setup, server, local_cache, tmp_path):
    tp2 = tmp_path / "tp2_cache"
    argv = cache_argv(setup, tp2, tmp_path, **{"parallel.tensor_model_parallel_size": 2})
    assert run_distributed(cache_on_rank, 2, argv, timeout=300) == [0, 0]
    remote = tmp_path / "server_cache"
    argv = cache_argv(setup, remote, tmp_path, teacher_model="null", teacher_model_server=server.url)
    assert run_distributed(cache_on_rank, 1, argv, timeout=300) == [0]
    for other in (tp2, remote):
        assert_same_cache(other, local_cache, atol=1e-5)


def test_cache_of_other_data_or_too_small_k_is_refused(setup, local_cache, tmp_path):
    with pytest.raises(DistributedTestError, match=r"gkd_logits_topk=9 is invalid with teacher_cache=.*top 8"):
        run(setup, tmp_path / "a", teacher_model="null", teacher_cache=str(local_cache), gkd_logits_topk=9)
    swapped = {"data.dataset": f"[{setup['val']}]", "training.global_batch_size": 8}
    with pytest.raises(DistributedTestError, match=r"does not match the train data at row"):
        run(setup, tmp_path / "b", teacher_model="null", teacher_cache=str(local_cache), gkd_logits_topk=K, **swapped)


# ----------------------------------------------------------------------------- faults of a real run

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_process(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatron_opd.train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True,
                            env={**os.environ, **SERVER_ENV})


def test_server_down_at_start_is_a_clear_error(setup, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    process = train_process(overrides(setup, tmp_path / "out", **served(
        url, **{"teacher_server.max_retries": 1, "teacher_server.retry_backoff_s": 0.1})))
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 1
    assert f"teacher server {url} failed GET /v1/models 2 times" in output and "ConnectionRefusedError" in output
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow  # ~46 s; faster: test_server_down_at_start_is_a_clear_error (the failure message),
# test_teacher_client (retries, timeouts), test_gkd_trainer.py::test_resume_continues_exactly (resume)
def test_server_killed_mid_run_fails_cleanly_and_the_run_resumes(setup, tmp_path):
    from megatron_opd.trainer.checkpointing import latest_checkpoint

    out = tmp_path / "out"
    port = free_port()
    argv = overrides(setup, out, **served(f"http://127.0.0.1:{port}", **{
        "teacher_server.max_retries": 2, "teacher_server.retry_backoff_s": 0.2, "teacher_server.timeout_s": 5,
        "training.train_iters": 60, "training.save_interval": 2}))
    server = launch(setup["served_teacher"], port=port, max_logprobs=8, env=SERVER_ENV)
    try:
        process = train_process(argv)
        # Ends either way: at iteration 4's checkpoint, or when the run stops by itself (60
        # steps), which fails the assert.
        while latest_checkpoint(out) is None or latest_checkpoint(out).name < "iter_0000004":
            assert process.poll() is None, f"training ended early:\n{process.stdout.read()}"
            time.sleep(0.05)
    finally:
        server.kill()
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 1, output
    assert f"teacher server http://127.0.0.1:{port} failed POST /v1/completions 3 times" in output
    last = latest_checkpoint(out)
    reached = int(last.name.split("_")[1])
    assert 4 <= reached < 60 and reached % 2 == 0

    with start_server(setup["served_teacher"], port=port, max_logprobs=8, env=SERVER_ENV):
        process = train_process(argv)
        output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert f"resumed from {last} at iteration {reached}" in output
    assert latest_checkpoint(out).name == "iter_0000060"


@pytest.mark.slow  # ~20 s; faster: test_gkd_with_the_server_equals_the_local_teacher (training against our server)
def test_teacher_server_script_starts_our_server_and_trains_against_it(setup, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("# everything from the command line\n")
    argv = [item for item in overrides(setup, tmp_path / "out", **{"teacher_server.verify_tokenizer": "false"})
            if not item.startswith("teacher_model=")]
    env = {**os.environ, **SERVER_ENV, "SERVER": "megatron", "TEACHER": setup["teacher"], "K": str(K),
           "PORT": str(free_port()), "NPROC": "1", "PYTHON": sys.executable}
    completed = subprocess.run(["bash", "examples/megatron/teacher_server.sh", str(config), *argv], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "done: iteration 2" in completed.stdout
