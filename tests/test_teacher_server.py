"""`megatron-opd serve-teacher`: vLLM's completions API from a Megatron model, over real HTTP.

Two servers run for the whole module (started together, reused by every test): a Llama
HF directory with a tokenizer at TP=1, and a Qwen3 (QK-norm, a head dim unlike
hidden/heads) converted to a megatron_opd checkpoint, without a tokenizer, at TP=2 under
torchrun. Log-probs are checked against HF transformers' log-softmax of the same
weights, the independent reference, within 1e-5: both models have logits of O(1) (Qwen2's
tied embeddings reach ~50, where fp32 rounding alone is ~1.5e-5). Every test gets its
server from `servers.get`, which restarts one that an earlier test stopped, so the tests
pass in any order and alone. Nothing is timed: waits poll the server's /health counters
(or its exit) for the event they wait for.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from megatron_opd.serve import TeacherServer, launch, start_server
from tests.hf_models import VOCAB, make_hf_model

K = 8  # --max-logprobs of both servers
MAX_MODEL_LEN = 256
MAX_PROMPTS = 64
MAX_REQUEST_BYTES = 1_000_000
ENV = {"MEGATRON_OPD_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
TOLERANCE = 1e-5


class Servers:
    """The module's servers by name, each (re)started on first use after it stopped."""

    def __init__(self, root: Path):
        llama = make_hf_model("llama2", root / "llama", seed=1, with_tokenizer=True)
        qwen3 = make_hf_model("qwen3", root / "qwen3", seed=2)
        limits = ["--max-model-len", str(MAX_MODEL_LEN), "--max-prompts-per-request", str(MAX_PROMPTS),
                  "--max-request-bytes", str(MAX_REQUEST_BYTES), "--batch-wait-ms", "10"]
        # TP=2 serves a megatron_opd checkpoint (made while the TP=1 server starts), and
        # broadcasts heartbeats every 0.1 s, so that every TP=2 test runs between them.
        self.references = {"tp1": llama, "tp2": qwen3}
        self.specs = {"tp1": dict(model=llama, tp=1, args=limits),
                      "tp2": dict(model=root / "qwen3_megatron", tp=2,
                                  args=[*limits, "--served-model-name", "qwen3-teacher", "--heartbeat-s", "0.1"])}
        self.running: dict[str, TeacherServer] = {}
        with ThreadPoolExecutor(len(self.specs)) as pool:
            tp1 = pool.submit(self._launch, "tp1")
            tp2 = pool.submit(self._convert_and_launch, qwen3, "tp2")
            self.running = {"tp1": tp1.result(), "tp2": tp2.result()}

    def _convert_and_launch(self, hf_dir: Path, name: str) -> TeacherServer:
        convert_to_megatron(hf_dir, self.specs[name]["model"])
        return self._launch(name)

    def _launch(self, name: str) -> TeacherServer:
        return launch(max_logprobs=K, env=ENV, startup_timeout=180, **self.specs[name])

    def get(self, name: str) -> TeacherServer:
        if self.running[name].process.poll() is not None:
            self.running[name] = self._launch(name)
        return self.running[name]

    def model_dir(self, name: str) -> Path:
        """What the server serves (the path as given on its command line)."""
        return self.specs[name]["model"]

    def reference_dir(self, name: str) -> Path:
        """The HF directory of the same weights, for transformers' reference."""
        return self.references[name]

    def close(self) -> None:
        for server in self.running.values():
            server.kill()


def convert_to_megatron(hf_dir: Path, out: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "megatron_opd.commands.cli", "convert", "hf-to-megatron", "--hf-path", str(hf_dir),
         "--out", str(out)], capture_output=True, text=True, env={**os.environ, **ENV}, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    pool = Servers(tmp_path_factory.mktemp("teacher_server"))
    yield pool
    pool.close()


# ------------------------------------------------------------------ HTTP helpers


def request(server: TeacherServer, method: str, path: str, body: Any = None,
            connection: Optional[http.client.HTTPConnection] = None) -> tuple[int, dict]:
    """(status, JSON body); `body` is sent as JSON unless it is already bytes."""
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    response = connection.getresponse()
    payload = json.loads(response.read())
    if own:
        connection.close()
    return response.status, payload


def complete(server: TeacherServer, body: dict, connection=None) -> dict:
    status, payload = request(server, "POST", "/v1/completions", body, connection)
    assert status == 200, payload
    return payload


def health(server: TeacherServer) -> dict:
    status, payload = request(server, "GET", "/health")
    assert status == 200 and payload["status"] == "ok", payload
    return payload


def wait_for(condition, what: str, server: TeacherServer, give_up_s: float = 120.0) -> None:
    """Poll until `condition()` holds. Not a timing claim: the bound only turns a server that
    never gets there into a failure that says what it waited for, instead of a hang."""
    deadline = time.monotonic() + give_up_s
    while not condition():
        assert server.process.poll() is None, f"the server exited while waiting for {what}:\n{server.log()}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


# ------------------------------------------------------------------ the reference


@functools.lru_cache(maxsize=None)
def hf_model(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")


def hf_logprobs(directory: Path, prompt: list[int]) -> torch.Tensor:
    """HF transformers' log-softmax `[L, V]` at every position of `prompt` (fp32 logits, fp64 softmax)."""
    with torch.no_grad():
        logits = hf_model(directory)(torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def assert_entry_matches(entry: dict, reference: torch.Tensor, token: int, k: int, decoded: bool) -> None:
    """One position's `{"<id>": {"logprob", "rank", "decoded_token"}}` against HF's log-probs `[V]`:
    vLLM's layout, the actual token first and then the top-k ranked 1..k; the actual token's
    rank is vLLM's, the count of ids at least as likely (its place when among the top-k)."""
    ids = reference.topk(k).indices.tolist()
    assert len(entry) == k + (token not in ids)
    assert list(entry) == [str(token)] + [str(i) for i in ids if i != token]
    assert [entry[str(i)]["rank"] for i in ids] == list(range(1, k + 1))
    for key, item in entry.items():
        assert abs(item["logprob"] - reference[int(key)].item()) < TOLERANCE, (key, item)
        assert item["decoded_token"] == (f"w{key}" if decoded else None)
    assert entry[str(token)]["rank"] == int((reference >= reference[token]).sum())


def random_prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    generator = random.Random(seed)
    return [[generator.randrange(VOCAB) for _ in range(length)] for length in lengths]


# ------------------------------------------------------------------ numerics


@pytest.mark.parametrize("name", ["tp1", "tp2"])
def test_prompt_logprobs_match_hf(servers, name):
    """Three prompts of different lengths in one request (one right-padded batch), each
    position against HF: the top-K ids and ranks, their log-probs and the actual token's."""
    server, directory = servers.get(name), servers.reference_dir(name)
    prompts = random_prompts(0, [5, 17, 1, 9])
    response = complete(server, {"prompt": prompts, "prompt_logprobs": K, "max_tokens": 0, "echo": True,
                                 "return_token_ids": True})
    assert response["model"] == server.name and response["object"] == "text_completion"
    # vLLM's count: one completion token per prompt even at max_tokens 0 (it generates one and drops it)
    assert response["usage"] == {"prompt_tokens": 32, "total_tokens": 36, "completion_tokens": 4}
    for index, (prompt, choice) in enumerate(zip(prompts, response["choices"])):
        assert choice["index"] == index and choice["token_ids"] == [] and choice["logprobs"] is None
        assert choice["prompt_token_ids"] == prompt
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(prompt) and entries[0] is None
        reference = hf_logprobs(directory, prompt)
        for t in range(1, len(prompt)):
            assert_entry_matches(entries[t], reference[t - 1], prompt[t], K, decoded=name == "tp1")


@pytest.mark.parametrize("name", ["tp1", "tp2"])
def test_generated_token(servers, name):
    """Greedy is HF's argmax, with its top-`logprobs`; a seeded sample repeats and is a real
    token whose log-prob is HF's (raw: the request's temperature does not change it)."""
    server, directory = servers.get(name), servers.reference_dir(name)
    prompt = random_prompts(1, [11])[0]
    reference = hf_logprobs(directory, prompt)[-1]
    greedy = complete(server, {"prompt": prompt, "temperature": 0, "logprobs": 3, "return_token_ids": True})
    greedy = greedy["choices"][0]
    top = int(reference.argmax())
    assert greedy["token_ids"] == [top] and greedy["finish_reason"] == "length"
    # the token's text after the prompt's (a space, then the word): vLLM's exact text is checked
    # against vLLM itself (test_vllm_fixtures, test_vllm_teacher)
    assert greedy["text"].strip() == (f"w{top}" if name == "tp1" else "")
    # vLLM names tokens by their text, or "token_id:<id>" (no tokenizer: the TP=2 model has none)
    token_name = (lambda i: f"w{i}") if name == "tp1" else (lambda i: f"token_id:{i}")
    logprobs = greedy["logprobs"]
    assert logprobs["tokens"] == [token_name(top)] and logprobs["text_offset"] == [0]
    assert abs(logprobs["token_logprobs"][0] - reference[top].item()) < TOLERANCE
    assert list(logprobs["top_logprobs"][0]) == [token_name(i) for i in reference.topk(3).indices.tolist()]

    body = {"prompt": prompt, "temperature": 2.0, "seed": 1234, "logprobs": 0, "return_token_ids": True}
    first, again = complete(server, body)["choices"][0], complete(server, body)["choices"][0]
    token = first["token_ids"][0]
    assert again["token_ids"] == [token] and 0 <= token < VOCAB
    assert abs(first["logprobs"]["token_logprobs"][0] - reference[token].item()) < TOLERANCE
    seeds = {complete(server, {**body, "seed": seed})["choices"][0]["token_ids"][0] for seed in range(8)}
    assert len(seeds) > 1, "eight seeds at temperature 2 all drew the same token"


def test_echo_scores_the_prompt_without_generating(servers):
    """echo=true with max_tokens=0 (axolotl's online KD request): the prompt's text back, and
    with `logprobs` its log-probs object over the prompt tokens (the first has none), each
    position's top items the actual token then the top-k, against HF."""
    server, directory = servers.get("tp1"), servers.reference_dir("tp1")
    prompt = random_prompts(2, [7])[0]
    reference = hf_logprobs(directory, prompt)
    choice = complete(server, {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2})["choices"][0]
    from transformers import AutoTokenizer

    assert choice["text"] == AutoTokenizer.from_pretrained(directory).decode(prompt)  # the prompt's ids decoded
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [f"w{token}" for token in prompt]
    assert logprobs["text_offset"] == [sum(len(f"w{t}") for t in prompt[:i]) for i in range(len(prompt))]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for t in range(1, len(prompt)):
        assert abs(logprobs["token_logprobs"][t] - reference[t - 1, prompt[t]].item()) < TOLERANCE
        top = [f"w{i}" for i in reference[t - 1].topk(2).indices.tolist()]
        assert list(logprobs["top_logprobs"][t]) == list(dict.fromkeys([f"w{prompt[t]}", *top]))
    assert len(choice["prompt_logprobs"]) == len(prompt)  # prompt_logprobs defaults to logprobs under echo


def test_text_prompt_equals_its_ids(servers):
    server = servers.get("tp1")
    as_text = complete(server, {"prompt": ["w5 w17 w3 w250", "w9"], "prompt_logprobs": 2, "temperature": 0,
                                "return_token_ids": True})
    as_ids = complete(server, {"prompt": [[5, 17, 3, 250], [9]], "prompt_logprobs": 2, "temperature": 0,
                               "return_token_ids": True})
    assert [c["prompt_logprobs"] for c in as_text["choices"]] == [c["prompt_logprobs"] for c in as_ids["choices"]]
    assert [c["token_ids"] for c in as_text["choices"]] == [c["token_ids"] for c in as_ids["choices"]]


def test_text_prompt_without_tokenizer_is_refused(servers):
    """The TP=2 model is a megatron_opd checkpoint: its tokenizer would be in `hf/`, which has none."""
    server = servers.get("tp2")
    status, payload = request(server, "POST", "/v1/completions", {"prompt": "w1 w2"})
    assert status == 400 and payload["error"]["param"] == "prompt"
    assert f"no tokenizer (none in {servers.model_dir('tp2') / 'hf'})" in payload["error"]["message"]
    health(server)


def test_idle_tp2_ranks_stay_in_step_through_heartbeats(servers):
    """Two heartbeats broadcast to the idle TP=2 ranks, then a request: both ranks still
    answer together (a rank out of step would hang or mismatch the broadcast)."""
    server = servers.get("tp2")
    before = health(server)
    wait_for(lambda: health(server)["heartbeats"] >= before["heartbeats"] + 2, "two heartbeats", server)
    assert health(server)["batches"] == before["batches"], "the heartbeats came while the server was idle"
    prompt = random_prompts(5, [6])[0]
    response = complete(server, {"prompt": prompt, "prompt_logprobs": 2, "max_tokens": 0, "echo": True})
    entries = response["choices"][0]["prompt_logprobs"]
    reference = hf_logprobs(servers.reference_dir("tp2"), prompt)
    for t in range(1, len(prompt)):
        assert_entry_matches(entries[t], reference[t - 1], prompt[t], 2, decoded=False)


def test_concurrent_requests_equal_sequential(servers):
    """32 requests (mixed lengths and options) from 8 threads on keep-alive connections give
    what they give one at a time, and the server did batch prompts of different requests.

    Equal up to float rounding, not bitwise: the same row in a batch of another shape goes
    through other BLAS blockings (measured ~1e-6)."""
    server = servers.get("tp1")
    rng = random.Random(7)
    bodies = [{"prompt": prompt, "prompt_logprobs": rng.choice([None, 0, 3, K]), "logprobs": rng.choice([None, 2]),
               "max_tokens": rng.choice([0, 1]), "temperature": rng.choice([0, 1.0]), "seed": i,
               "return_token_ids": True}
              for i, prompt in enumerate(random_prompts(8, [rng.randrange(1, 40) for _ in range(32)]))]
    for body in bodies:
        body["echo"] = body["max_tokens"] == 0  # max_tokens 0 only with echo, as in vLLM
    sequential = [complete(server, body) for body in bodies]
    before = health(server)
    local = threading.local()

    def send(body: dict) -> dict:
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        return complete(server, body, local.connection)

    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(send, bodies))
    after = health(server)
    assert after["prompts"] - before["prompts"] == 32
    assert after["batches"] - before["batches"] < 32, "no batch held prompts of two requests"
    for one, other in zip(sequential, concurrent):
        assert_same_choice(one["choices"][0], other["choices"][0])


def assert_same_choice(one: dict, other: dict) -> None:
    assert one["token_ids"] == other["token_ids"] and one["text"] == other["text"]
    assert (one["logprobs"] is None) == (other["logprobs"] is None)
    if one["logprobs"] is not None:  # under echo, over the prompt too (its first token has none)
        assert one["logprobs"]["tokens"] == other["logprobs"]["tokens"]
        for a, b in zip(one["logprobs"]["top_logprobs"], other["logprobs"]["top_logprobs"], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert_close_maps(a, b)
    assert (one["prompt_logprobs"] is None) == (other["prompt_logprobs"] is None)
    for a, b in zip(one["prompt_logprobs"] or [], other["prompt_logprobs"] or []):
        assert (a is None) == (b is None)
        if a is not None:
            assert {key: v["rank"] for key, v in a.items()} == {key: v["rank"] for key, v in b.items()}
            assert_close_maps({key: v["logprob"] for key, v in a.items()}, {key: v["logprob"] for key, v in b.items()})


def assert_close_maps(one: dict, other: dict) -> None:
    assert list(one) == list(other)
    assert all(abs(one[key] - other[key]) < TOLERANCE for key in one)


# ------------------------------------------------------------------ the API surface


def test_models_card_and_health(servers):
    status, payload = request(servers.get("tp2"), "GET", "/v1/models")
    assert status == 200 and payload["object"] == "list"
    (card,) = payload["data"]
    assert card["id"] == "qwen3-teacher" and card["object"] == "model" and card["owned_by"] == "megatron_opd"
    assert card["root"] == str(servers.model_dir("tp2"))
    assert (card["max_model_len"], card["vocab_size"], card["max_logprobs"]) == (MAX_MODEL_LEN, VOCAB, K)
    status, payload = request(servers.get("tp1"), "GET", "/v1/models")
    assert payload["data"][0]["id"] == str(servers.model_dir("tp1"))  # vLLM's default: the path
    assert set(health(servers.get("tp1"))) >= {"status", "requests", "batches", "prompts", "errors"}


BAD_REQUESTS = [
    # (body, status, param, a fragment of the message)
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
    (b'{"prompt": [1], "temperature": NaN}', 400, None, "not valid JSON"),
    ({}, 400, "prompt", "prompt is required"),
    ({"prompt": {"a": 1}}, 400, "prompt", "a list of token ids"),
    ({"prompt": [[1, 2], "w1"]}, 400, "prompt", "a list of token ids"),
    ({"prompt": []}, 400, "prompt", "a list of token ids"),
    ({"prompt": [[]]}, 400, "prompt", "prompt 0 is empty"),
    ({"prompt": [1, VOCAB]}, 400, "prompt", f"[0, {VOCAB})"),
    ({"prompt": [[1], [2, -1]]}, 400, "prompt", "prompt 1 has token id -1"),
    ({"prompt": [1, 2.0]}, 400, "prompt", "token ids must be integers"),
    ({"prompt": [1] * (MAX_MODEL_LEN + 1)}, 400, "prompt", f"at most {MAX_MODEL_LEN - 1} prompt tokens"),
    # a prompt plus one output token must fit, as in vLLM: max_model_len tokens do not
    ({"prompt": [1] * MAX_MODEL_LEN, "echo": True, "max_tokens": 0}, 400, "prompt", f"max_model_len={MAX_MODEL_LEN}"),
    ({"prompt": [[1]] * (MAX_PROMPTS + 1)}, 400, "prompt", "--max-prompts-per-request"),
    ({"prompt": [1], "prompt_logprobs": K + 1}, 400, "prompt_logprobs",
     f"Requested prompt logprobs of {K + 1}, which is greater than max allowed: {K}"),
    ({"prompt": [1], "prompt_logprobs": -1}, 400, "prompt_logprobs",  # -1 is the whole vocab, bounded by K
     f"Requested prompt logprobs of {VOCAB}, which is greater than max allowed: {K}"),
    ({"prompt": [1], "prompt_logprobs": -2}, 400, "prompt_logprobs", "must be a positive value or -1"),
    ({"prompt": [1], "prompt_logprobs": "3"}, 400, "prompt_logprobs", "an integer in [0, 8]"),
    ({"prompt": [1], "prompt_logprobs": True}, 400, "prompt_logprobs", "an integer in [0, 8]"),
    ({"prompt": [1], "logprobs": K + 1}, 400, "logprobs",
     f"Requested sample logprobs of {K + 1}, which is greater than max allowed: {K}"),
    ({"prompt": [1], "max_tokens": 2}, 400, "max_tokens", "generates at most one token"),
    ({"prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens", "only with echo=true"),
    (b'{"prompt": [1], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, "nested too deeply"),
    ({"prompt": [1], "temperature": -0.5}, 400, "temperature", ">= 0"),
    ({"prompt": [1], "seed": "x"}, 400, "seed", "64-bit"),
    ({"prompt": [1, 2], "echo": "yes"}, 400, "echo", "true or false"),
    ({"prompt": [1], "stream": True}, 400, "stream", "only false"),
    ({"prompt": [1], "n": 2}, 400, "n", "only 1"),
    ({"prompt": [1], "best_of": 3}, 400, "best_of", "only 1"),
    ({"prompt": [1], "top_p": 0.5}, 400, "top_p", "only null or 1"),
    ({"prompt": [1], "model": "other"}, 404, "model", "`other` does not exist"),
]


def test_bad_requests_get_errors_and_the_server_stays_up(servers):
    server = servers.get("tp1")
    errors_before = health(server)["errors"]
    for body, status, param, fragment in BAD_REQUESTS:
        got, payload = request(server, "POST", "/v1/completions", body)
        error = payload["error"]
        assert (got, error["code"], error["param"]) == (status, status, param), (body, payload)
        assert fragment in error["message"], (body, error["message"])
        assert error["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    ok = complete(server, {"prompt": [1, 2], "model": server.name, "unknown_field": {"x": 1}, "top_p": 1.0})
    assert ok["choices"][0]["prompt_logprobs"] is None
    assert health(server)["errors"] - errors_before == len(BAD_REQUESTS)


def test_http_errors(servers):
    server = servers.get("tp1")
    status, payload = request(server, "GET", "/v1/chat/completions")
    assert status == 404 and payload["error"]["type"] == "NotFoundError"
    assert "/v1/completions" in payload["error"]["message"]  # the message lists the routes
    status, payload = request(server, "GET", "/v1/completions")
    assert status == 405 and "use POST" in payload["error"]["message"]
    status, payload = request(server, "POST", "/health", {})
    assert status == 405
    # 413 from the header alone: the body is never sent, so the server must not wait for it.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_REQUEST_BYTES + 1}\r\n"
                     "Content-Type: application/json\r\n\r\n".encode())
        reply = sock.makefile("rb").read()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"--max-request-bytes" in body
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.makefile("rb").read().startswith(b"HTTP/1.1 411")
    health(server)


def test_bad_arguments_exit_1_before_loading(servers, tmp_path, capsys, monkeypatch):
    from megatron_opd.commands.serve_teacher import main

    model = str(servers.model_dir("tp1"))
    cases = [
        (["--model", str(tmp_path / "missing")], "does not exist"),
        (["--model", model, "--max-logprobs", "0"], "--max-logprobs 0 is invalid"),
        (["--model", model, "--max-logprobs", str(VOCAB + 1)], f"at most the vocab size {VOCAB}"),
        (["--model", model, "--tp", "2"], "torchrun --nproc-per-node 2"),
        (["--model", model, "--max-model-len", "999999"], "max_position_embeddings"),
        (["--model", model, "--port", "70000"], "--port 70000 is invalid"),
        (["--model", model, "--tokenizer", str(tmp_path)], "holds no tokenizer files"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 1, argv
        assert fragment in capsys.readouterr().err, argv
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun would: --tp 3 passes the world check, not the heads
    assert main(["--model", model, "--tp", "3"]) == 1
    assert "num_attention_heads" in capsys.readouterr().err


# ------------------------------------------------------------------ shutdown (stops a server; the next get restarts it)


def port_is_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_answers_accepted_requests_and_exits_0(servers):
    """SIGTERM with one large request being served and another queued behind it: both get
    their full answers, a request after the signal gets 503, the process exits 0 and the
    port closes."""
    server = servers.get("tp1")
    body = {"prompt": random_prompts(3, [MAX_MODEL_LEN - 1] * MAX_PROMPTS), "prompt_logprobs": K, "max_tokens": 0,
            "echo": True}
    answers: list[dict] = []
    senders = [threading.Thread(target=lambda: answers.append(complete(server, body))) for _ in range(2)]
    processed_before = health(server)["prompts"]
    for sender in senders:
        sender.start()

    def accepted() -> int:  # prompts submitted since the start: answered plus pending
        state = health(server)
        return state["prompts"] - processed_before + state["pending"]

    wait_for(lambda: accepted() >= 2 * MAX_PROMPTS, "both requests accepted", server)
    answered_when_signalled = len(answers)
    server.terminate()

    def stopping() -> bool:  # /health says 503 "stopping" once the signal handler has run
        status, payload = request(server, "GET", "/health")
        return status == 503 and payload["status"] == "stopping"

    wait_for(stopping, "the server to take the signal", server)
    status, payload = request(server, "POST", "/v1/completions", {"prompt": [1]})
    assert (status, payload["error"]) == (503, {"message": "the server is shutting down",
                                                "type": "ServiceUnavailableError", "param": None, "code": 503})
    assert server.process.wait(60) == 0
    for sender in senders:
        sender.join(60)
    assert answered_when_signalled < 2, "both requests were answered before the signal: nothing was drained"
    assert len(answers) == 2
    for answer in answers:
        assert len(answer["choices"]) == MAX_PROMPTS
        assert all(len(c["prompt_logprobs"]) == MAX_MODEL_LEN - 1 for c in answer["choices"])
    assert port_is_closed(server.port)
    # It drained what it had accepted (no request left open), then stopped.
    log = server.log()
    assert "stopping with requests still open" not in log, log
    stopped = re.search(r"stopped after (\d+) batches of (\d+) prompts", log)
    assert stopped and int(stopped.group(2)) >= processed_before + 2 * MAX_PROMPTS, log


def test_sigterm_at_tp2_exits_0(servers):
    server = servers.get("tp2")
    complete(server, {"prompt": [1, 2, 3], "prompt_logprobs": 1})
    prompts = health(server)["prompts"]
    assert server.stop(timeout=60) == 0  # torchrun's exit code: both ranks exited 0
    assert port_is_closed(server.port)
    log = server.log()
    assert "stopping with requests still open" not in log, log
    stopped = re.search(r"stopped after (\d+) batches of (\d+) prompts", log)
    assert stopped and int(stopped.group(2)) == prompts, log


def test_killed_server_restarts_on_its_port(servers):
    """What a trainer's test does to its teacher: SIGKILL mid-run, then a new server at the same address."""
    server = servers.get("tp1")
    body = {"prompt": [4, 8, 15, 16, 23, 42], "prompt_logprobs": 3, "temperature": 0}
    before = complete(server, body)["choices"][0]
    server.kill()
    assert server.process.returncode == -9 and port_is_closed(server.port)
    spec = servers.specs["tp1"]
    # --tokenizer: the same files, named explicitly (as vLLM's flag).
    args = [*spec["args"], "--tokenizer", str(spec["model"])]
    with start_server(spec["model"], port=server.port, max_logprobs=K, args=args, env=ENV) as again:
        assert again.url == server.url
        assert_same_choice(complete(again, body)["choices"][0], before)
        text = complete(again, {**body, "prompt": "w4 w8 w15 w16 w23 w42"})["choices"][0]
        assert_same_choice(text, before)
    assert again.process.returncode == 0
