"""Real vLLM (`vllm serve`, the CPU build here) as the teacher server, against the in-process teacher.

One vLLM server for the module (start-up is the slow part: about a minute, several on a
loaded machine), serving the GKD setup's teacher (Qwen3) in fp32 with a context of
MAX_MODEL_LEN = 48 tokens, shorter than ServerTeacher's old 125-token start-up probe, so
every run here also checks that the probes are sized from `/v1/models`' `max_model_len`.

- the teacher cache written through vLLM (ServerTeacher's answers) equals the in-process
  teacher's top-K (ids equal, log-probs within 1e-5; fp32 on both sides, O(1) logits);
- GKD through vLLM equals GKD with the in-process teacher's top-K (loss and update);
- our `serve-teacher` on the same model answers the same requests as vLLM does;
- `examples/megatron/teacher_server.sh` with SERVER=vllm starts vLLM itself and trains.

`make test-vllm` installs vLLM and runs these; without vLLM they fail, saying so.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opd.serve.launch import start_server
from megatron_opd.testing import run_distributed
from tests.gkd_setup import overrides
from tests.helpers.teacher_runs import (
    K,
    SERVER_ENV,
    assert_same_cache,
    cache_argv,
    cache_on_rank,
    served,
    served_teacher_setup,
)
from tests.helpers.trainer_runs import assert_same_update, merged, run
from tests.helpers.vllm_compare import Comparison, exchange
from tests.helpers.vllm_server import free_port, vllm_server
from tests.hf_models import VOCAB

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).parents[1]
MAX_MODEL_LEN = 48
MAX_LOGPROBS = 8
# A random model with O(1) logits, fp32 on both sides: ours and vLLM's log-probs agree to ~1e-6.
COMPARISON = Comparison(atol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    # A Qwen3 teacher: head_dim 32. vLLM's CPU attention has no kernel for the other tiny
    # families' head_dim 16 ("Unsupported CPU attention configuration").
    return served_teacher_setup(tmp_path_factory.mktemp("vllm_teacher"), teacher_family="qwen3")


@pytest.fixture(scope="module")
def vllm(setup, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm_log") / "vllm.log"
    with vllm_server(setup["served_teacher"], max_logprobs=MAX_LOGPROBS, max_model_len=MAX_MODEL_LEN,
                     log_path=log) as server:
        yield server


def test_the_old_probe_would_not_fit(setup):
    """What makes the runs below check the probe sizing: the unsized probe is longer than the context."""
    from transformers import AutoTokenizer

    from megatron_opd.teachers.server import probe_text

    tokenizer = AutoTokenizer.from_pretrained(setup["tokenizer"])
    assert len(tokenizer(probe_text(tokenizer))["input_ids"]) > MAX_MODEL_LEN
    assert len(tokenizer(probe_text(tokenizer, MAX_MODEL_LEN - 1))["input_ids"]) == MAX_MODEL_LEN - 1


def test_cache_through_vllm_equals_the_local_teacher(setup, vllm, tmp_path):
    """ServerTeacher's top-K (K=8) from vLLM, with the tokenizer check on, against the in-process
    teacher's (`fused_linear_topk_logprobs`, itself tested against float64 dense math)."""
    local, remote = tmp_path / "local_cache", tmp_path / "vllm_cache"
    assert run_distributed(cache_on_rank, 1, cache_argv(setup, local, tmp_path), timeout=300) == [0]
    argv = cache_argv(setup, remote, tmp_path, teacher_model="null", teacher_model_server=vllm.url,
                      **{"teacher_server.verify_tokenizer": "true"})
    assert run_distributed(cache_on_rank, 1, argv, timeout=300) == [0]
    assert_same_cache(remote, local, atol=1e-5)


def test_gkd_through_vllm_equals_the_local_teacher(setup, vllm, tmp_path):
    """One GKD step with the teacher's top-K from vLLM against the in-process teacher's top-K path:
    the same loss and update (as test_server_teacher does with our server)."""
    local = merged(run(setup, tmp_path / "local", gkd_logits_topk=K))
    remote = merged(run(setup, tmp_path / "remote", **served(vllm.url)))
    assert remote["steps"][0]["tokens"] == local["steps"][0]["tokens"]
    assert remote["steps"][0]["loss"] == pytest.approx(local["steps"][0]["loss"], rel=1e-5)
    assert local["steps"][0]["loss"] > 0.05
    assert_same_update(remote, local, 1e-5)


def requests_to_compare() -> list[tuple[str, dict, bool]]:
    """(name, request, whether an error's param and message are vLLM's) for both servers."""
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(length)] for length in (9, 3, 17)]
    path = "/v1/completions"

    def post(**body) -> dict:
        return {"method": "POST", "path": path, "body": body}

    return [
        ("models", {"method": "GET", "path": "/v1/models"}, False),
        ("topk", post(prompt=prompts[0], max_tokens=1, temperature=0, prompt_logprobs=MAX_LOGPROBS), False),
        ("batch", post(prompt=prompts, max_tokens=1, temperature=0, prompt_logprobs=3), False),
        ("echo", post(prompt=prompts[2], max_tokens=0, echo=True, prompt_logprobs=5), False),
        ("echo_logprobs", post(prompt=prompts[1], max_tokens=0, echo=True, logprobs=2), False),
        ("generated", post(prompt=prompts[2], max_tokens=1, temperature=0, logprobs=4, return_token_ids=True), False),
        ("text", post(prompt="w5 w17 w3 w250", max_tokens=1, temperature=0, prompt_logprobs=0), False),
        ("full_vocab", post(prompt=prompts[1], max_tokens=1, prompt_logprobs=-1), True),
        ("above_max", post(prompt=prompts[1], max_tokens=1, prompt_logprobs=MAX_LOGPROBS + 1), True),
        ("negative", post(prompt=prompts[1], max_tokens=1, prompt_logprobs=-2), True),
        ("max_tokens_0", post(prompt=prompts[1], max_tokens=0, prompt_logprobs=1), True),
        ("fills_context", post(prompt=[1] * MAX_MODEL_LEN, max_tokens=0, echo=True, prompt_logprobs=1), False),
        ("too_long", post(prompt=[1] * (MAX_MODEL_LEN + 1), max_tokens=1), False),
        ("nested", {"method": "POST", "path": path,
                    "body": b'{"prompt": [1], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"}, False),
    ]


def test_our_server_answers_as_vllm_does(setup, vllm):
    """The same requests to vLLM and to `megatron-opd serve-teacher` on the same weights: the
    same status and error fields, and on success vLLM's structure and numbers (vllm_compare)."""
    name = str(setup["served_teacher"])  # both serve the model under its path
    with start_server(setup["served_teacher"], max_logprobs=MAX_LOGPROBS, env=SERVER_ENV,
                      args=["--max-model-len", str(MAX_MODEL_LEN)]) as ours:
        for what, request, same_param in requests_to_compare():
            body = request.get("body")
            if isinstance(body, dict):
                body = {"model": name, **body}
            answers = [exchange(server.url, request["method"], request["path"], body) for server in (ours, vllm)]
            COMPARISON.answer(*answers, {**request, "body": body}, what, same_param=same_param)


def test_teacher_server_script_starts_vllm_and_trains_against_it(setup, tmp_path):
    """examples/megatron/teacher_server.sh with SERVER=vllm on this machine (vLLM's CPU build):
    it starts `vllm serve` on the teacher, waits for it, trains two steps against it (the
    tokenizer check on), and stops it."""
    config = tmp_path / "run.yaml"
    config.write_text("# everything from the command line\n")
    argv = [item for item in overrides(setup, tmp_path / "out") if not item.startswith("teacher_model=")]
    env = {**os.environ, **SERVER_ENV, "SERVER": "vllm", "TEACHER": setup["served_teacher"], "K": str(K),
           "PORT": str(free_port()), "NPROC": "1", "PYTHON": sys.executable,
           "VLLM_ARGS": f"--max-model-len {MAX_MODEL_LEN}"}
    completed = subprocess.run(["bash", "examples/megatron/teacher_server.sh", str(config), *argv], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    assert "done: iteration 2" in completed.stdout
