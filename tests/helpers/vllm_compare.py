"""Our server's answer against vLLM's to the same request: status, error fields, structure, numbers.

vLLM's answer is the reference (recorded in tests/fixtures/vllm, or live from `vllm serve`):
on success ours has vLLM's keys in vLLM's order (less `VLLM_ONLY_FIELDS`), every
prompt_logprobs entry the actual token first with an integer rank and then the top-k at
ranks 1..k with the same ids, decoded tokens and log-probs within `atol`; the logprobs
object the same token names, offsets and values. Ids of exactly tied tokens (`tied`, known
from how the model was made) may trade places, since which of a tie a top-k takes first
is torch.topk's choice on each side.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Optional

from tests.helpers.vllm_fixtures import VLLM_ONLY_FIELDS

def exchange(url: str, method: str, path: str, body: Any = None, timeout: float = 120.0) -> tuple[int, Any]:
    """(status, decoded JSON) of one request; `body` is sent as JSON unless it is bytes."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def requested_k(body: dict) -> Optional[int]:
    """The K of a request's prompt_logprobs (under echo, `logprobs` when it gives none), -1 as
    None (the whole vocab: every entry's ranks then run 1..V)."""
    k = body.get("prompt_logprobs")
    if k is None:
        k = body.get("logprobs")
    return None if k == -1 else k


def ours_of(theirs: list[str]) -> list[str]:
    """vLLM's keys in order, less the fields this server does not send."""
    return [key for key in theirs if key not in VLLM_ONLY_FIELDS]


def by_rank(entry: dict, k: int) -> dict[int, tuple[int, float]]:
    """rank -> (id, logprob) of an entry's top-k."""
    return {item["rank"]: (int(key), item["logprob"]) for key, item in entry.items() if item["rank"] <= k}


def assert_entry_order(entry: dict, k: int, where: str) -> None:
    """vLLM's order: the actual token first, then the top-k by rank (the actual token, when among
    them, only once, at the front)."""
    actual, *rest = [int(key) for key in entry]
    assert rest == [token for _, (token, _) in sorted(by_rank(entry, k).items()) if token != actual], where


@dataclass(frozen=True)
class Comparison:
    """How close ours must be to vLLM's: `atol` on log-probs, `tied` the ids with equal logits."""

    atol: float
    tied: frozenset = field(default_factory=frozenset)

    def close(self, ours: Optional[float], theirs: Optional[float], where: str) -> None:
        assert (ours is None) == (theirs is None), where
        if ours is not None:
            assert math.isfinite(ours) and abs(ours - theirs) <= self.atol, (where, ours, theirs)

    def entry(self, ours: Optional[dict], theirs: Optional[dict], k: Optional[int], where: str) -> None:
        """One prompt_logprobs entry (see the module docstring). A tied actual token at the k-th
        value may be inside the top-k on one side (rank k) and outside on the other (k + 1)."""
        assert (ours is None) == (theirs is None), where
        if theirs is None:
            return
        k = len(theirs) if k is None else k
        actual = list(theirs)[0]
        assert list(ours)[0] == actual, (where, ours, theirs)
        assert all(type(item["rank"]) is int for item in ours.values()), (where, ours)
        assert_entry_order(ours, k, where)
        assert_entry_order(theirs, k, where)
        rank, their_rank = ours[actual]["rank"], theirs[actual]["rank"]
        assert rank == their_rank or (int(actual) in self.tied and {rank, their_rank} == {k, k + 1}), \
            (where, ours, theirs)
        mine, vllm = by_rank(ours, k), by_rank(theirs, k)
        assert sorted(mine) == sorted(vllm) == list(range(1, k + 1)), (where, ours, theirs)
        for r, (token, value) in vllm.items():
            assert mine[r][0] == token or {mine[r][0], token} == self.tied, (where, r, ours, theirs)
            self.close(mine[r][1], value, f"{where} rank {r}")
        for key, item in ours.items():
            assert item["decoded_token"] == theirs.get(key, item)["decoded_token"], (where, key)
        self.close(ours[actual]["logprob"], theirs[actual]["logprob"], f"{where} token {actual}")

    def logprobs_object(self, ours: Optional[dict], theirs: Optional[dict], where: str) -> None:
        assert (ours is None) == (theirs is None), where
        if theirs is None:
            return
        assert list(ours) == list(theirs), where
        assert ours["tokens"] == theirs["tokens"] and ours["text_offset"] == theirs["text_offset"], where
        for i, (mine, vllm) in enumerate(zip(ours["token_logprobs"], theirs["token_logprobs"], strict=True)):
            self.close(mine, vllm, f"{where} token_logprobs[{i}]")
        for i, (mine, vllm) in enumerate(zip(ours["top_logprobs"], theirs["top_logprobs"], strict=True)):
            assert (mine is None) == (vllm is None) and list(mine or {}) == list(vllm or {}), (where, i, mine, vllm)
            for key in vllm or {}:
                self.close(mine[key], vllm[key], f"{where} top_logprobs[{i}][{key!r}]")

    def choice(self, ours: dict, theirs: dict, request: dict, where: str) -> None:
        assert list(ours) == ours_of(list(theirs)), where
        for key in ("index", "text", "stop_reason", "token_ids", "prompt_token_ids"):
            assert ours[key] == theirs[key], (where, key, ours[key], theirs[key])
        if not (request.get("echo") and request.get("max_tokens") == 0):
            # At max_tokens 0 vLLM reports on a token it generated and dropped; this server generates none.
            assert ours["finish_reason"] == theirs["finish_reason"], where
        self.logprobs_object(ours["logprobs"], theirs["logprobs"], f"{where} logprobs")
        assert (ours["prompt_logprobs"] is None) == (theirs["prompt_logprobs"] is None), where
        for t, (mine, vllm) in enumerate(zip(ours["prompt_logprobs"] or [], theirs["prompt_logprobs"] or [],
                                             strict=True)):
            self.entry(mine, vllm, requested_k(request), f"{where} prompt_logprobs[{t}]")

    def completion(self, ours: dict, theirs: dict, request: dict, where: str) -> None:
        assert list(ours) == ours_of(list(theirs)), where
        assert (ours["object"], ours["model"]) == (theirs["object"], theirs["model"]), where
        assert ours["usage"] == {key: theirs["usage"][key] for key in ours_of(list(theirs["usage"]))}, where
        assert len(ours["choices"]) == len(theirs["choices"]), where
        for ours_choice, their_choice in zip(ours["choices"], theirs["choices"]):
            self.choice(ours_choice, their_choice, request, where)

    def models(self, ours: dict, theirs: dict) -> None:
        """`GET /v1/models`: the same model id and max_model_len, the shared fields in one order."""
        (ours_card,), (their_card,) = ours["data"], theirs["data"]
        assert ours["object"] == theirs["object"] == "list"
        assert [key for key in their_card if key in ours_card] == [key for key in ours_card if key in their_card]
        assert (ours_card["id"], ours_card["max_model_len"]) == (their_card["id"], their_card["max_model_len"])

    def answer(self, ours: tuple[int, Any], theirs: tuple[int, Any], request: dict, where: str,
               same_param: bool = False) -> None:
        """Any exchange: the same status; then by kind (models, completion, error). `same_param`:
        an error whose `param` is vLLM's too and whose message starts with vLLM's (then says how
        to fix it); elsewhere ours names the field this server checks (e.g. "prompt" for a prompt
        that fills the context, where vLLM blames the max_tokens it clamped to 0)."""
        (status, mine), (their_status, vllm) = ours, theirs
        assert status == their_status, (where, mine, vllm)
        if request["path"] == "/v1/models":
            self.models(mine, vllm)
        elif status == 200:
            self.completion(mine, vllm, request.get("body") or {}, where)
        elif "error" in vllm:  # OpenAI's error body (vLLM's own 400s; FastAPI's body errors are {"detail"})
            assert (mine["error"]["type"], mine["error"]["code"]) == (vllm["error"]["type"], vllm["error"]["code"])
            if same_param:
                assert mine["error"]["param"] == vllm["error"]["param"], (where, mine, vllm)
                assert mine["error"]["message"].startswith(vllm["error"]["message"].split(" (parameter=")[0]), \
                    (where, mine["error"]["message"], vllm["error"]["message"])
        else:
            assert set(mine) == {"error"} and mine["error"]["code"] == status, (where, mine)
