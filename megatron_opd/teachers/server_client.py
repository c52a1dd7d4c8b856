"""HTTP to a teacher server that speaks OpenAI's `/v1/completions` with vLLM's `prompt_logprobs`.

Per sequence one request,

    POST /v1/completions {"model": M, "prompt": [ids], "max_tokens": 1, "prompt_logprobs": K, "temperature": 0}

whose `choices[0].prompt_logprobs` has one entry per prompt token: null for the first,
then `{"<id>": {"logprob": x, "rank": r, "decoded_token": s}, ...}` holding token t itself
(first, in vLLM's order) and the K most likely ids of the distribution that predicts it
(K entries when t is among them, else K + 1), at temperature 1 (vLLM's default
`logprobs_mode`). vLLM ranks the top-K 1..K and token t, when outside them, by the count
of vocab entries at least as likely (>= K + 1; exactly K + 1 when it ties the K-th value,
common with bf16 teachers). `parse_prompt_logprobs` turns it into `[L - 1, K]` arrays
and refuses anything else by name: fewer than K entries, ids outside the vocab, values
that are not log-probabilities, a length that is not the prompt's.

Written on the standard library (`http.client` over a thread pool): the client needs
keep-alive connections, a bound on requests in flight, a timeout per request and its
own retry policy and error messages; `requests`/`httpx` would add a dependency and none
of that. Connection errors, timeouts, 429 and 5xx are retried with exponential backoff;
a 4xx or an answer that does not parse fails at once (a retry cannot fix it). Every
failure is a `TeacherServerError` naming the server: never a zero or a guessed teacher.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import numpy as np

from megatron_opd.config.errors import UserError
from megatron_opd.config.job import TeacherServerConfig

MAX_BACKOFF_S = 30.0
RETRY_STATUSES = {429, 500, 502, 503, 504}
# Servers compute log-probs in fp32 (or bf16): a top token's value can round a hair above 0.
LOGPROB_SLACK = 1e-3


class TeacherServerError(UserError, RuntimeError):
    """The teacher server is unreachable, refused a request, or answered something unusable."""


class _Retryable(Exception):
    """A failure that another attempt may not have: connection, timeout, 429, 5xx."""


@dataclass
class PromptLogprobs:
    """The teacher's answer for one sequence of L tokens, positions 1..L-1 (numpy)."""

    logprobs: np.ndarray  # [L - 1, K] float32, sorted descending per row
    ids: np.ndarray  # [L - 1, K] int64
    token_logprobs: np.ndarray  # [L - 1] float32: log p of the token actually at each position


class TeacherServerClient:
    """Requests to one server; thread-safe (one keep-alive connection per thread)."""

    def __init__(self, url: str, settings: TeacherServerConfig):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TeacherServerError(f"teacher_model_server={url!r} is not an http(s) URL")
        self.url = url.rstrip("/")
        self.settings = settings
        self._scheme, self._host = parts.scheme, parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        if self._prefix.endswith("/v1"):  # "http://host:8000/v1", as OpenAI clients take it
            self._prefix = self._prefix[:-len("/v1")]
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix="teacher-server")
        self.retries = 0  # attempts after a retryable failure, over the client's life

    # ------------------------------------------------------------------ transport

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            kind = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            connection = kind(self._host, self._port, timeout=self.settings.timeout_s)
            self._local.connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def _attempt(self, method: str, path: str, body: Optional[bytes]) -> Any:
        connection = self._connection()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        try:
            connection.request(method, self._prefix + path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as error:  # refused, reset, timeout, bad status line
            self._drop_connection()
            kind = "timed out" if isinstance(error, (socket.timeout, TimeoutError)) else type(error).__name__
            raise _Retryable(f"{kind}: {error}" if str(error) else kind) from error
        if response.status in RETRY_STATUSES:
            raise _Retryable(f"HTTP {response.status}: {_error_message(payload)}")
        if response.status != 200:
            raise TeacherServerError(f"teacher server {self.url} refused {method} {path} with HTTP "
                                     f"{response.status}: {_error_message(payload)}")
        try:
            return json.loads(payload)
        except ValueError as error:
            raise TeacherServerError(f"teacher server {self.url} answered {method} {path} with invalid JSON "
                                     f"({error}): {payload[:200]!r}") from None

    def request(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        """The decoded JSON answer; retries retryable failures with exponential backoff."""
        data = None if body is None else json.dumps(body).encode()
        attempts = self.settings.max_retries + 1
        started = time.monotonic()
        for attempt in range(attempts):
            try:
                return self._attempt(method, path, data)
            except _Retryable as error:
                last = error
                if attempt + 1 < attempts:
                    self.retries += 1
                    time.sleep(min(self.settings.retry_backoff_s * 2 ** attempt, MAX_BACKOFF_S))
        raise TeacherServerError(f"teacher server {self.url} failed {method} {path} {attempts} times in "
                                 f"{time.monotonic() - started:.1f} s (timeout {self.settings.timeout_s} s per "
                                 f"request); last error: {last}")

    def map(self, function, items: Sequence) -> list:
        """`function` over `items` on the pool (at most `max_concurrency` in flight), in order."""
        return list(self._pool.map(function, items))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ the API

    def model_cards(self) -> list[dict]:
        answer = self.request("GET", "/v1/models")
        cards = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(cards, list) or not all(isinstance(card, dict) and "id" in card for card in cards):
            raise TeacherServerError(f"teacher server {self.url}: GET /v1/models is not an OpenAI model list: "
                                     f"{str(answer)[:200]}")
        return cards

    def completion(self, model: str, prompt, prompt_logprobs: int) -> dict:
        """`choices[0]` of a one-token completion of `prompt` (ids or text) with its prompt log-probs."""
        answer = self.request("POST", "/v1/completions", {
            "model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": prompt_logprobs})
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise TeacherServerError(f"teacher server {self.url}: the completion has no choices: "
                                     f"{str(answer)[:200]}")
        return choices[0]


def _error_message(payload: bytes) -> str:
    """The server's error text (OpenAI's {"error": {"message"}}, vLLM's {"message"}), or the body."""
    try:
        answer = json.loads(payload)
    except ValueError:
        return payload[:300].decode(errors="replace")
    if isinstance(answer, dict):
        error = answer.get("error", answer)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
    return str(answer)[:300]


def _entry_logprob(value: Any) -> float:
    logprob = value.get("logprob") if isinstance(value, dict) else value
    if isinstance(logprob, bool) or not isinstance(logprob, (int, float)):
        raise ValueError(f"{value!r} has no numeric logprob")
    return float(logprob)


def _entry_rank(value: Any) -> Optional[int]:
    rank = value.get("rank") if isinstance(value, dict) else None
    return rank if isinstance(rank, int) and not isinstance(rank, bool) else None


def _position_pairs(entry: Any, position: int, vocab_size: int) -> list[tuple[int, float, Optional[int]]]:
    """One prompt_logprobs entry as `(id, logprob, rank or None)` in the server's order, each
    id inside the vocab and each value a log-probability."""
    if not isinstance(entry, dict):
        raise ValueError(f"prompt_logprobs[{position}] is {type(entry).__name__}, expected an object of "
                         "token id -> logprob")
    try:
        items = [(int(key), _entry_logprob(value), _entry_rank(value)) for key, value in entry.items()]
    except ValueError as error:
        raise ValueError(f"prompt_logprobs[{position}]: {error}") from None
    for token, value, _ in items:
        if not 0 <= token < vocab_size:
            raise ValueError(f"prompt_logprobs[{position}] has token id {token}, outside the student's vocab "
                             f"[0, {vocab_size}): a different tokenizer or model?")
        if math.isnan(value) or value > LOGPROB_SLACK:
            raise ValueError(f"prompt_logprobs[{position}] gives token {token} logprob {value}: not a "
                             "log-probability")
    return items


def _top_k(items: list[tuple[int, float, Optional[int]]], actual: int, k: int, position: int
           ) -> list[tuple[int, float]]:
    """The K most likely `(id, logprob)` of one entry, most likely first.

    With ranks on every entry (vLLM), the top-K are the entries ranked 1..K: the prompt
    token outside them ranks >= K + 1, even when it ties the K-th value, so ranks and not
    values decide which of tied entries is in. Without ranks (older servers), the K + 1-th
    entry is the prompt token outside the top-K; the rest sorted by value.
    """
    if len(items) < k:
        raise ValueError(f"prompt_logprobs[{position}] has {len(items)} entries, fewer than the K={k} asked "
                         "for (start the server with --max-logprobs >= K)")
    if all(rank is not None for _, _, rank in items):
        top = sorted((item for item in items if item[2] <= k), key=lambda item: item[2])
        ranks = [rank for _, _, rank in top]
        if ranks != list(range(1, k + 1)):
            raise ValueError(f"prompt_logprobs[{position}]: the entries ranked <= {k} have ranks {ranks}, not "
                             f"1..{k}: the server returned fewer than K top tokens")
    else:
        if len(items) > k + 1:
            raise ValueError(f"prompt_logprobs[{position}] has {len(items)} entries without ranks, more than "
                             f"the K + 1 = {k + 1} (the top-K and the prompt token) a server returns for K={k}")
        top = [item for item in items if len(items) == k or item[0] != actual]
        top.sort(key=lambda item: -item[1])
    values = [value for _, value, _ in top]
    if any(later > earlier for earlier, later in zip(values, values[1:])):
        raise ValueError(f"prompt_logprobs[{position}]: the top-{k} log-probs {values} do not descend with rank")
    return [(token, value) for token, value, _ in top]


def parse_prompt_logprobs(choice: dict, prompt: Sequence[int], k: int, vocab_size: int) -> PromptLogprobs:
    """The K most likely ids and log-probs at positions 1..L-1 of `prompt`, and the prompt
    tokens' own log-probs; ValueError (the caller names the server and row) otherwise."""
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) != len(prompt):
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ValueError(f"prompt_logprobs has {got} entries for a prompt of {len(prompt)} tokens (the server "
                         "must score exactly the given ids: no truncation, no added tokens)")
    rows = len(prompt) - 1
    logprobs = np.empty((rows, k), dtype=np.float32)
    ids = np.empty((rows, k), dtype=np.int64)
    token_logprobs = np.empty(rows, dtype=np.float32)
    for position in range(1, len(prompt)):
        items = _position_pairs(entries[position], position, vocab_size)
        actual = int(prompt[position])
        value = next((value for token, value, _ in items if token == actual), None)
        if value is None:
            raise ValueError(f"prompt_logprobs[{position}] lacks the prompt token {actual} itself")
        top = _top_k(items, actual, k, position)
        ids[position - 1] = [token for token, _ in top]
        logprobs[position - 1] = [min(value, 0.0) for _, value in top]
        token_logprobs[position - 1] = min(value, 0.0)
    return PromptLogprobs(logprobs, ids, token_logprobs)


def served_tokens(choice: dict) -> list[int]:
    """The server's own tokenization of a text prompt, from an answer with prompt_logprobs=0
    (each entry holds only the prompt token); the first token is not shown."""
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or not entries:
        raise ValueError("the answer has no prompt_logprobs list")
    tokens = []
    for position, entry in enumerate(entries[1:], start=1):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"prompt_logprobs[{position}] should hold exactly the prompt token with "
                             f"prompt_logprobs=0, got {str(entry)[:100]}")
        tokens.append(int(next(iter(entry))))
    return tokens
