"""The teacher-server client against scripted servers: parsing, retries, timeouts, refusals.

A scripted server (the standard library's HTTP server in a thread) answers each request
the way a test tells it to: vLLM's format, or a broken variant. Every broken answer must
become a `TeacherServerError` or `ValueError` that says what is wrong; none may turn
into numbers.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from megatron_opd.config.job import TeacherServerConfig
from megatron_opd.teachers.server_client import (
    TeacherServerClient,
    TeacherServerError,
    parse_prompt_logprobs,
    served_tokens,
)

VOCAB = 50
QUICKSTART_TEACHER = Path(__file__).resolve().parents[1] / "megatron_opd" / "quickstart" / "teacher"
HANG_S = 5.0  # how long a "hang" server holds each request: far past the client's 0.3 s timeout


def vllm_entry(position_logprobs: dict[int, float], rank_of=None) -> dict:
    return {str(token): {"logprob": value, "rank": (rank_of or {}).get(token), "decoded_token": f"t{token}"}
            for token, value in position_logprobs.items()}


def distribution(position: int) -> dict[int, float]:
    """The test's teacher at `position`: log-probs over the whole VOCAB, descending in the id."""
    return {token: -0.1 * (token + 1) - 0.01 * position for token in range(VOCAB)}


def vllm_position(values: dict[int, float], actual: int, k: int) -> dict:
    """One entry as vLLM 0.32 builds it (`append_logprobs_for_next_position`): the actual token
    first, ranked by the count of ids at least as likely, then the top-k ranked 1..k (the actual
    token among them keeps its first place and takes its top-k rank)."""
    top = sorted(values, key=lambda token: -values[token])[:k]
    ranks = {actual: sum(value >= values[actual] for value in values.values())}
    ranks.update({token: rank for rank, token in enumerate(top, start=1)})
    return vllm_entry({token: values[token] for token in [actual, *top]}, ranks)


def answer_for(prompt: list[int], k: int) -> dict:
    """A well-formed vLLM answer for `prompt` under `distribution`."""
    entries = [None] + [vllm_position(distribution(t), prompt[t], k) for t in range(1, len(prompt))]
    return {"choices": [{"index": 0, "text": "x", "prompt_logprobs": entries, "finish_reason": "length"}]}


def test_parse_takes_the_top_k_and_the_prompt_tokens_own_logprob():
    prompt = [3, 1, 40, 2]
    choice = answer_for(prompt, 4)["choices"][0]
    assert list(choice["prompt_logprobs"][2])[0] == "40", "vLLM lists the actual token first"
    parsed = parse_prompt_logprobs(choice, prompt, 4, VOCAB)
    assert parsed.ids.shape == (3, 4) and parsed.logprobs.dtype == np.float32
    assert parsed.ids.tolist() == [[0, 1, 2, 3]] * 3, "the extra entry (token 40, outside the top 4) is not in the top K"
    for t in range(1, 4):
        assert parsed.logprobs[t - 1].tolist() == pytest.approx([distribution(t)[i] for i in range(4)], abs=1e-6)
    assert parsed.token_logprobs.tolist() == pytest.approx([distribution(t)[prompt[t]] for t in range(1, 4)], abs=1e-6)


def tied_position(actual_first: bool) -> tuple[dict, int]:
    """K=3 and the prompt token tied with the 3rd value but outside the top-3, as vLLM sends it:
    token 9 (the prompt token, rank 4: four ids are >= its value) first, then 0, 1, 2."""
    values = {0: -0.1, 1: -0.2, 2: -0.3, 9: -0.3}
    order = [9, 0, 1, 2] if actual_first else [0, 1, 2, 9]
    return vllm_entry({token: values[token] for token in order}, {0: 1, 1: 2, 2: 3, 9: 4}), 9


@pytest.mark.parametrize("actual_first", [True, False])
def test_parse_takes_the_top_k_by_rank_when_the_prompt_token_ties_the_kth_value(actual_first):
    """vLLM's answer when the prompt token ties the K-th value (ranks 1..K and K + 1): by value
    alone the prompt token could be one of the top K; by rank it is not."""
    entry, actual = tied_position(actual_first)
    parsed = parse_prompt_logprobs({"prompt_logprobs": [None, entry]}, [5, actual], 3, VOCAB)
    assert parsed.ids.tolist() == [[0, 1, 2]]
    assert parsed.logprobs[0].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert parsed.token_logprobs.tolist() == pytest.approx([-0.3])


def test_parse_prompt_token_inside_the_top_k_keeps_its_rank():
    """The prompt token among the top K (K entries): it is one of them, at its rank."""
    entry = vllm_entry({2: -0.3, 0: -0.1, 1: -0.2}, {2: 3, 0: 1, 1: 2})
    parsed = parse_prompt_logprobs({"prompt_logprobs": [None, entry]}, [5, 2], 3, VOCAB)
    assert parsed.ids.tolist() == [[0, 1, 2]] and parsed.token_logprobs.tolist() == pytest.approx([-0.3])


def test_parse_answers_without_ranks_by_value():
    """A server that sends no ranks (null): the K + 1-th entry is the prompt token outside the
    top K, even when tied with the K-th value; the rest by value."""
    values = {9: -0.3, 2: -0.3, 0: -0.1, 1: -0.2}
    entry = vllm_entry(values)  # every rank null
    parsed = parse_prompt_logprobs({"prompt_logprobs": [None, entry]}, [5, 9], 3, VOCAB)
    assert parsed.ids.tolist() == [[0, 1, 2]] and parsed.token_logprobs.tolist() == pytest.approx([-0.3])
    with pytest.raises(ValueError, match="5 entries without ranks, more than the K \\+ 1 = 4"):
        parse_prompt_logprobs({"prompt_logprobs": [None, vllm_entry({**values, 7: -3.0})]}, [5, 9], 3, VOCAB)


@pytest.mark.parametrize("damage,message", [
    (lambda entries: entries.pop(), "prompt_logprobs has 3 entries for a prompt of 4 tokens"),
    (lambda entries: entries[1].pop("0"), "fewer than the K=4"),
    (lambda entries: entries[1].update({"77": {"logprob": -5.0}}), "token id 77, outside the student's vocab"),
    (lambda entries: entries[1].update({"9": {"logprob": float("nan")}}), "logprob nan: not a log-probability"),
    (lambda entries: entries[1].update({"9": {"logprob": 0.5}}), "logprob 0.5: not a log-probability"),
    (lambda entries: entries[2].pop("40"), "lacks the prompt token 40 itself"),
    (lambda entries: entries[1].update({"x": {"logprob": -1.0}}), "invalid literal"),
    (lambda entries: entries[1].update({"9": {"rank": 3}}), "has no numeric logprob"),
    (lambda entries: entries[1]["1"].update({"logprob": -0.05}), r"top-4 log-probs .* do not descend with rank"),
    (lambda entries: entries.__setitem__(2, [1, 2]), r"prompt_logprobs\[2\] is list"),
])
def test_parse_refuses_damaged_answers_by_name(damage, message):
    prompt = [3, 1, 40, 2]
    choice = answer_for(prompt, 4)["choices"][0]
    damage(choice["prompt_logprobs"])
    with pytest.raises(ValueError, match=message):
        parse_prompt_logprobs(choice, prompt, 4, VOCAB)


def test_served_tokens_reads_the_servers_tokenization():
    choice = {"prompt_logprobs": [None, vllm_entry({5: -1.0}), vllm_entry({7: -2.0})]}
    assert served_tokens(choice) == [5, 7]
    with pytest.raises(ValueError, match="exactly the prompt token"):
        served_tokens({"prompt_logprobs": [None, vllm_entry({5: -1.0, 6: -2.0})]})


class ScriptedServer:
    """A local HTTP server whose `/v1/completions` behaviour is `mode`; in mode "hang" it
    answers after HANG_S seconds (or once `release` is set, at the test's end), counting
    what it answered."""

    def __init__(self, mode: str = "ok", max_model_len=None, tokenizer=None):
        self.mode, self.requests, self.answered = mode, 0, 0
        self.release = threading.Event()
        # mode "context": vLLM's context rule (a prompt plus one output token must fit in
        # max_model_len, else its 400) and text prompts through `tokenizer`
        self.max_model_len, self.tokenizer, self.prompt_lengths = max_model_len, tokenizer, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status: int, body: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except BrokenPipeError:  # the client gave up (timeout tests)
                    pass

            def do_GET(self):
                card = {"id": "teacher"} | ({"max_model_len": server.max_model_len} if server.max_model_len else {})
                self.reply(200, json.dumps({"object": "list", "data": [card]}).encode())

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests += 1
                if server.mode == "hang":
                    server.release.wait(HANG_S)
                    server.answered += 1
                if server.mode == "malformed":
                    return self.reply(200, b'{"choices": [')
                if server.mode == "bad_request":
                    return self.reply(400, json.dumps({"error": {"message": "prompt_logprobs 5 > max 2"}}).encode())
                if server.mode == "flaky" and server.requests <= 2:
                    return self.reply(503, json.dumps({"message": "warming up"}).encode())
                prompt = request["prompt"]
                if server.mode == "context":
                    if isinstance(prompt, str):
                        prompt = server.tokenizer(prompt)["input_ids"]
                    server.prompt_lengths.append(len(prompt))
                    if len(prompt) >= server.max_model_len:
                        return self.reply(400, json.dumps({"error": {"message": (
                            f"The decoder prompt (length {len(prompt)}) plus the number of requested output tokens "
                            f"(at least 1) is longer than the maximum model length of {server.max_model_len}.")}}
                        ).encode())
                self.reply(200, json.dumps(answer_for(prompt, request["prompt_logprobs"])).encode())

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True  # closing does not wait for a sleeping handler
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def scripted():
    servers = []

    def start(mode: str = "ok", **options) -> ScriptedServer:
        servers.append(ScriptedServer(mode, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def client(url: str, **settings) -> TeacherServerClient:
    return TeacherServerClient(url, TeacherServerConfig(**{"retry_backoff_s": 0.01, **settings}))


def test_well_formed_answers_round_trip_concurrently(scripted):
    server = scripted()
    teacher = client(server.url + "/v1", max_concurrency=4)  # an OpenAI-style base URL works too
    assert [card["id"] for card in teacher.model_cards()] == ["teacher"]
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]] * 4
    choices = teacher.map(lambda prompt: teacher.completion("teacher", prompt, 3), prompts)
    for prompt, choice in zip(prompts, choices):
        assert parse_prompt_logprobs(choice, prompt, 3, VOCAB).ids.shape == (len(prompt) - 1, 3)
    assert server.requests == len(prompts)


def test_5xx_is_retried_with_backoff(scripted):
    server = scripted("flaky")
    teacher = client(server.url, max_retries=3)
    choice = teacher.completion("teacher", [1, 2, 3], 2)
    assert len(choice["prompt_logprobs"]) == 3 and teacher.retries == 2 and server.requests == 3


def test_retries_run_out_with_a_message_naming_the_server(scripted):
    server = scripted("flaky")
    with pytest.raises(TeacherServerError, match=rf"teacher server {server.url} failed POST /v1/completions 2 "
                                                 r"times .* last error: HTTP 503: warming up"):
        client(server.url, max_retries=1).completion("teacher", [1, 2], 1)


def test_slow_server_hits_the_timeout(scripted):
    """A server that holds each request for HANG_S before answering: a client that honours
    its 0.3 s timeout gives up on both attempts and raises while the server has answered
    neither; one that waited (no timeout, or one of seconds) would get an answer."""
    server = scripted("hang")
    with pytest.raises(TeacherServerError, match=r"failed POST /v1/completions 2 times .*timeout 0.3 s per request"
                                                 r".*timed out"):
        client(server.url, timeout_s=0.3, max_retries=1).completion("teacher", [1, 2], 1)
    assert server.answered == 0, "the timeout was not honoured"


def test_malformed_json_and_4xx_fail_at_once(scripted):
    malformed = scripted("malformed")
    with pytest.raises(TeacherServerError, match="answered POST /v1/completions with invalid JSON"):
        client(malformed.url, max_retries=3).completion("teacher", [1, 2], 1)
    assert malformed.requests == 1, "a malformed answer is not retried"
    refused = scripted("bad_request")
    with pytest.raises(TeacherServerError, match=r"refused POST /v1/completions with HTTP 400: prompt_logprobs 5 > max 2"):
        client(refused.url, max_retries=3).completion("teacher", [1, 2], 5)
    assert refused.requests == 1


def test_unreachable_server_is_an_error_not_a_hang():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TeacherServerError, match=rf"http://127.0.0.1:{port} failed GET /v1/models 3 times.*"
                                                 r"ConnectionRefusedError"):
        client(f"http://127.0.0.1:{port}", max_retries=2).model_cards()


def test_ranks_expose_a_short_top_k():
    """K entries of which one is the prompt token outside the top: ranks show only K - 1 are top."""
    prompt = [3, 9]
    ranked = {"choices": [{"prompt_logprobs": [None, vllm_entry({0: -0.1, 1: -0.2, 2: -0.3, 9: -5.0},
                                                                 rank_of={0: 1, 1: 2, 2: 3, 9: 20})]}]}
    with pytest.raises(ValueError, match=r"the entries ranked <= 4 have ranks \[1, 2, 3\], not 1..4"):
        parse_prompt_logprobs(ranked["choices"][0], prompt, 4, VOCAB)
    assert parse_prompt_logprobs(ranked["choices"][0], prompt, 3, VOCAB).ids.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("verify_tokenizer", [True, False])
def test_connect_sizes_its_probes_from_max_model_len(scripted, verify_tokenizer):
    """The quickstart teacher's 64 positions, its character tokenizer (the unsized probe text is
    125 tokens): both probes fit a prompt plus one output token in max_model_len, as vLLM
    requires, and a training sequence that cannot fit fails before it is sent, naming the fix."""
    from transformers import AutoTokenizer

    from megatron_opd.teachers.server import ServerTeacher, probe_text

    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART_TEACHER)
    assert len(tokenizer(probe_text(tokenizer))["input_ids"]) > 64
    server = scripted("context", max_model_len=64, tokenizer=tokenizer)
    settings = TeacherServerConfig(retry_backoff_s=0.01, verify_tokenizer=verify_tokenizer)
    teacher = ServerTeacher.__new__(ServerTeacher)  # connect() alone: no parallel state needed
    teacher.url, teacher.settings, teacher.k, teacher.vocab_size = server.url, settings, 3, 15
    teacher.client, teacher.model_name, teacher.max_prompt_tokens = client(server.url), None, None
    teacher.connect(tokenizer)
    assert server.prompt_lengths and max(server.prompt_lengths) == 63
    assert len(server.prompt_lengths) == 1 + verify_tokenizer
    with pytest.raises(TeacherServerError, match=r"a sequence of 64 tokens is longer than the 63 the server takes "
                                                 r"\(max_model_len=64.*--max-model-len"):
        teacher._ask([[2] * 64], where="a training step")
