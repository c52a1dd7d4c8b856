"""The OpenAI-style completions API as vLLM serves it: request validation and response bodies.

Pure Python, no torch and no HTTP: `server.py` hands the raw body bytes in and writes the
dicts returned here out as JSON. Every rejected request raises `ApiError`, whose message
names the field and the allowed values, and whose status and JSON body follow OpenAI's
(and vLLM's) error format:

    {"error": {"message": "...", "type": "BadRequestError", "param": "max_tokens", "code": 400}}

What a completions request may ask of this server (anything else is a 400 naming the
field; fields this module does not know are ignored, since OpenAI clients send extras).
Where vLLM 0.32 accepts the same request, the answer has its format and semantics
(tests/fixtures/vllm holds its recorded answers; tests/test_vllm_fixtures.py compares):

- `prompt`: token ids `[int, ...]`, a string, or a list of either (one choice each); a
  prompt plus one output token must fit in `max_model_len`, as vLLM requires.
- `prompt_logprobs`: null, 0..K or -1 (the whole vocab, which must be <= K): per prompt
  token a dict of the token itself first (its vLLM rank: the count of vocab entries at
  least as likely) and then the top-k with ranks 1..k. K is `--max-logprobs`; above it is
  vLLM's 400 "Requested prompt logprobs of ...".
- `max_tokens`: 1, or 0 with `echo: true` (score the prompt, generate nothing: the request
  axolotl's online KD sends); `logprobs`: null, 0..K or -1 for the generated token, and under
  `echo` for the prompt tokens too (`prompt_logprobs` then defaults to it, as in vLLM);
  `temperature` >= 0 (0 is greedy) and `seed` for the sampling.
- `return_token_ids`, `return_tokens_as_token_ids` as in vLLM.
- `stream`, `n`, `best_of` only at their defaults; sampling knobs this server does not
  implement (`top_p`, `top_k`, penalties, ...) only at their neutral values.

Stricter than vLLM on purpose: no `max_tokens` > 1 (this server scores; it generates at
most one token), no booleans or floats where vLLM's pydantic would coerce them to ints.
"""

from __future__ import annotations

import json
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

from megatron_opd.config.schema import is_int

if TYPE_CHECKING:
    from megatron_opd.serve.engine import PromptScores, TopLogprobs

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
                411: "LengthRequiredError", 413: "RequestTooLargeError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# vLLM's stand-in for a log-prob of -inf in JSON (`clamp_prompt_logprobs`, `max(logprob, -9999.0)`).
LOGPROB_FLOOR = -9999.0

# Sampling fields vLLM accepts that would change the one sampled token: refused unless
# null or neutral, rather than silently ignored.
_NEUTRAL_SAMPLING = {"top_p": (1,), "top_k": (-1, 0), "min_p": (0,), "presence_penalty": (0,),
                     "frequency_penalty": (0,), "repetition_penalty": (1,), "logit_bias": ({},)}


class ApiError(Exception):
    """A request this server answers with an error: HTTP `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "APIError"),
                          "param": self.param, "code": self.status}}


def bad_request(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param)


class TextCodec(Protocol):
    """What the API needs of a tokenizer (`serve.tokenizer.HFTextCodec`)."""

    eos_token_id: Optional[int]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool) -> str: ...

    def continuation(self, prompt: Sequence[int], token_ids: Sequence[int]) -> str: ...

    def decode_token(self, token_id: int) -> str: ...


@dataclass(frozen=True)
class ServedModel:
    """The model behind the API and the limits requests are checked against."""

    name: str
    root: str
    max_model_len: int
    vocab_size: int  # the true vocab (ModelConfig.vocab_size): ids >= it are Megatron's padding
    max_logprobs: int  # K: the most top-logprobs a request may ask for
    max_prompts_per_request: int
    tokenizer_note: str  # why text prompts are refused, when there is no tokenizer

    def card(self) -> dict[str, Any]:
        """The model's entry in `GET /v1/models`: vLLM's fields (clients size requests by
        `max_model_len`), then this server's `vocab_size` and `max_logprobs`."""
        return {"id": self.name, "object": "model", "created": int(time.time()), "owned_by": "megatron_opd",
                "root": self.root, "parent": None, "max_model_len": self.max_model_len,
                "vocab_size": self.vocab_size, "max_logprobs": self.max_logprobs}


@dataclass(frozen=True)
class CompletionRequest:
    """A validated completions request: its prompts as token ids and what to return for each."""

    prompts: list[list[int]]
    texts: list[Optional[str]]  # each prompt as sent when it was text (echo returns it), else None
    prompt_logprobs: Optional[int]  # top-k per prompt token (-1 resolved to the vocab); None: not returned
    logprobs: Optional[int]  # top-k of the `logprobs` object (-1 resolved); None: no such object
    max_tokens: int  # 1, or 0 with echo
    echo: bool
    temperature: float
    seed: int  # drawn at random when the request gave none, so all TP ranks share it
    return_token_ids: bool
    tokens_as_ids: bool  # return_tokens_as_token_ids: "token_id:<id>" instead of decoded text


def _show(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (400 otherwise; NaN and Infinity are not JSON).

    A body nested deeper than Python's recursion limit is a 400 too (vLLM's "error parsing
    the body"), not a RecursionError escaping as a 500."""
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise bad_request("request body is nested too deeply to parse: a completions request is a flat "
                          "JSON object") from None
    if not isinstance(value, dict):
        raise bad_request(f"request body must be a JSON object, got {type(value).__name__}")
    return value


def _int_field(body: dict, field: str, low: int, high: int, default: Optional[int], allowed: str
               ) -> Optional[int]:
    value = body.get(field)
    if value is None:
        return default
    if not is_int(value) or not low <= value <= high:
        raise bad_request(f"{field}={_show(value)} is invalid: {allowed}", field)
    return value


def _bool_field(body: dict, field: str, default: bool) -> bool:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{field}={_show(value)} is invalid: true or false", field)
    return value


def _only_default(body: dict, field: str, defaults: tuple, allowed: str) -> None:
    value = body.get(field)
    if value is not None and (isinstance(value, bool) != isinstance(defaults[0], bool) or value not in defaults):
        raise bad_request(f"{field}={_show(value)} is not supported: only {allowed}", field)


def _logprobs_field(body: dict, field: str, kind: str, served: ServedModel) -> Optional[int]:
    """`prompt_logprobs` / `logprobs` as vLLM reads them: null, an integer >= 0, or -1 for the
    whole vocab; more than the server's K is vLLM's 400 (its message, then how to raise K)."""
    k = served.max_logprobs
    value = body.get(field)
    if value is None:
        return None
    if not is_int(value):
        raise bad_request(f"{field}={_show(value)} is invalid: null, -1 (the whole vocab) or an integer in "
                          f"[0, {k}] (this server runs with --max-logprobs {k})", field)
    if value < -1:
        raise bad_request(f"`{field}` must be a positive value or -1. (parameter={field}, value={value})", field)
    wanted = served.vocab_size if value == -1 else value
    if wanted > k:
        raise bad_request(f"Requested {kind} logprobs of {wanted}, which is greater than max allowed: {k} "
                          f"(parameter={field}, value={wanted}); start the server with --max-logprobs >= {wanted}",
                          field)
    return wanted


def _max_tokens(body: dict, echo: bool) -> int:
    """1, or 0 with echo (vLLM: "max_tokens must be at least 1" without echo)."""
    value = body.get("max_tokens")
    if value is None:
        return 1
    if not is_int(value) or value < 0:
        raise bad_request(f"max_tokens={_show(value)} is invalid: 1, or 0 with echo=true", "max_tokens")
    if value == 0 and not echo:
        raise bad_request("max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0); 0 is allowed "
                          "only with echo=true (score the prompt, generate nothing)", "max_tokens")
    if value > 1:
        raise bad_request(f"max_tokens={value} is not supported: this server scores prompts and generates at "
                          "most one token (1, or 0 with echo=true)", "max_tokens")
    return value


def _check_model(body: dict, served: ServedModel) -> None:
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise bad_request(f"model={_show(model)} is invalid: a string, the served model name", "model")
    if model != served.name:
        raise ApiError(404, f"The model `{model}` does not exist: this server serves `{served.name}`", "model")


def _prompt_ids(prompt: Any, index: int, served: ServedModel, codec: Optional[TextCodec],
                add_special_tokens: bool) -> list[int]:
    if isinstance(prompt, str):
        if codec is None:
            raise bad_request(f"prompt {index} is text, but {served.tokenizer_note}: send token ids", "prompt")
        ids = codec.encode(prompt, add_special_tokens)
    else:
        bad = next((token for token in prompt if not is_int(token) or not 0 <= token < served.vocab_size), None)
        if bad is not None:
            raise bad_request(f"prompt {index} has token id {_show(bad)}: token ids must be integers in "
                              f"[0, {served.vocab_size})", "prompt")
        ids = list(prompt)
    if not ids:
        raise bad_request(f"prompt {index} is empty: every prompt needs at least one token", "prompt")
    # vLLM counts at least one output token even at max_tokens 0 with echo (it generates one
    # and drops it), so a prompt of max_model_len tokens is a 400 there too.
    if len(ids) >= served.max_model_len:
        raise bad_request(f"prompt {index} has {len(ids)} tokens: a prompt plus at least one output token must fit "
                          f"in max_model_len={served.max_model_len}, so at most {served.max_model_len - 1} "
                          "prompt tokens (as vLLM counts)", "prompt")
    return ids


def _prompts(body: dict, served: ServedModel, codec: Optional[TextCodec]
             ) -> tuple[list[list[int]], list[Optional[str]]]:
    """`prompt` as token-id lists, one prompt (ids or text) or a list of them, and the texts."""
    prompt = body.get("prompt")
    shapes = "a string, a list of token ids, or a list of strings or of token-id lists"
    if prompt is None:
        raise bad_request(f"prompt is required: {shapes}", "prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and not isinstance(prompt[0], (str, list))):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, type(prompt[0])) for p in prompt):
        prompts = prompt
    else:
        raise bad_request(f"prompt={_show(prompt)} is invalid: {shapes}", "prompt")
    if len(prompts) > served.max_prompts_per_request:
        raise bad_request(f"prompt has {len(prompts)} prompts, more than the {served.max_prompts_per_request} "
                          "allowed per request (--max-prompts-per-request)", "prompt")
    add_special_tokens = _bool_field(body, "add_special_tokens", True)
    ids = [_prompt_ids(p, i, served, codec, add_special_tokens) for i, p in enumerate(prompts)]
    return ids, [p if isinstance(p, str) else None for p in prompts]


def _temperature(body: dict) -> float:
    value = body.get("temperature")
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise bad_request(f"temperature={_show(value)} is invalid: a number >= 0 (0 is greedy)", "temperature")
    return float(value)


def parse_completion_request(body: bytes, served: ServedModel, codec: Optional[TextCodec]) -> CompletionRequest:
    """Validate a `POST /v1/completions` body; raise `ApiError` naming the first bad field."""
    request = parse_json_object(body)
    _check_model(request, served)
    _only_default(request, "stream", (False,), "false (one JSON response per request)")
    prompt_logprobs = _logprobs_field(request, "prompt_logprobs", "prompt", served)
    logprobs = _logprobs_field(request, "logprobs", "sample", served)
    echo = _bool_field(request, "echo", False)
    if prompt_logprobs is None and echo:
        prompt_logprobs = logprobs  # vLLM: echo returns the prompt's log-probs at `logprobs`
    max_tokens = _max_tokens(request, echo)
    temperature = _temperature(request)
    seed = _int_field(request, "seed", INT64_MIN, INT64_MAX, None, "null or a 64-bit signed integer")
    _only_default(request, "n", (1,), "1 (one completion per prompt)")
    _only_default(request, "best_of", (1,), "1 (one completion per prompt)")
    for field, neutral in _NEUTRAL_SAMPLING.items():
        _only_default(request, field, neutral, f"null or {_show(neutral[0])} (the one token is sampled from "
                                               "the model's distribution at `temperature`)")
    prompts, texts = _prompts(request, served, codec)
    return CompletionRequest(
        prompts=prompts, texts=texts, prompt_logprobs=prompt_logprobs, logprobs=logprobs, max_tokens=max_tokens,
        echo=echo, temperature=temperature, seed=seed if seed is not None else secrets.randbits(63),
        return_token_ids=_bool_field(request, "return_token_ids", False),
        tokens_as_ids=_bool_field(request, "return_tokens_as_token_ids", False))


# ---------------------------------------------------------------------------- responses


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def _decoder(codec: Optional[TextCodec]) -> Callable[[int], Optional[str]]:
    return codec.decode_token if codec is not None else (lambda token_id: None)


def _position_entry(token: int, token_logprob: float, token_rank: int, top_ids: Sequence[int],
                    top_values: Sequence[float], decode: Callable[[int], Optional[str]]) -> dict[str, dict[str, Any]]:
    """One position's `{"<id>": {"logprob", "rank", "decoded_token"}}` in vLLM's order: the
    actual token first with its rank, then the top-k with ranks 1..k (the actual token,
    when among them, keeps its first place: vLLM builds the dict from [token, *top-k])."""
    entry = {str(token): {"logprob": _logprob(token_logprob), "rank": token_rank, "decoded_token": decode(token)}}
    for rank, (i, value) in enumerate(zip(top_ids, top_values), start=1):
        entry.setdefault(str(i), {"logprob": _logprob(value), "rank": rank, "decoded_token": decode(i)})
    return entry


def _entries(top: TopLogprobs, k: int, decode) -> list[dict[str, dict[str, Any]]]:
    """`_position_entry` at each of the n positions of `top` (`[n, >= k]` top ids)."""
    return [_position_entry(token, value, rank, ids, values, decode) for token, value, rank, ids, values in zip(
        top.token_ids.tolist(), top.token_logprobs.tolist(), top.token_ranks.tolist(),
        top.ids[:, :k].tolist(), top.logprobs[:, :k].tolist())]


class _TokenText:
    """How the `logprobs` object names tokens: vLLM's decoded text, or "token_id:<id>" under
    `return_tokens_as_token_ids` (and without a tokenizer, where there is no text)."""

    def __init__(self, codec: Optional[TextCodec], as_ids: bool):
        self.codec = None if as_ids else codec

    def __call__(self, token_id: int) -> str:
        return self.codec.decode_token(token_id) if self.codec is not None else f"token_id:{token_id}"


def _completion_logprobs(tokens: list[int], entries: list[Optional[dict]], k: int, name: _TokenText
                         ) -> dict[str, list]:
    """OpenAI's completions `logprobs` object over `tokens` (vLLM's `_create_completion_logprobs`):
    per token its name, log-prob, and the first k + 1 items of its entry (the token first,
    then its top-k) keyed by name; null for a token without an entry (a prompt's first)."""
    offsets, names, token_logprobs, tops = [], [], [], []
    offset = 0
    for token, entry in zip(tokens, entries):
        names.append(name(token))
        offsets.append(offset)
        offset += len(names[-1])
        if entry is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(entry[str(token)]["logprob"])
        items = list(entry.items())[:k + 1]
        tops.append({name(int(key)): item["logprob"] for key, item in items})
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": names, "top_logprobs": tops}


def _choice_text(request: CompletionRequest, index: int, generated: list[int], codec: Optional[TextCodec]) -> str:
    """vLLM's `text`: the generated token's text after the prompt (special tokens skipped, as its
    detokenizer does), after the prompt's text under echo (as sent, or its ids decoded; none
    with return_token_ids)."""
    if codec is None:
        return ""
    text = codec.continuation(request.prompts[index], generated) if generated else ""
    if not request.echo or request.return_token_ids:
        return text
    prompt = request.texts[index]
    if prompt is None:
        prompt = codec.decode(request.prompts[index], skip_special_tokens=False)
    return prompt + text


def _choice(request: CompletionRequest, index: int, scores: PromptScores, codec: Optional[TextCodec]
            ) -> dict[str, Any]:
    """One choice, keys in vLLM's order."""
    prompt = request.prompts[index]
    decode = _decoder(codec)
    prompt_entries = None
    if request.prompt_logprobs is not None:
        prompt_entries = [None, *_entries(scores.prompt, request.prompt_logprobs, decode)]
    generated = [] if scores.generated is None else [int(scores.generated.token_ids[0])]
    logprobs = None
    if request.logprobs is not None:
        tokens, entries = [], []
        if request.echo:
            tokens, entries = list(prompt), list(prompt_entries)
        if generated:
            tokens.append(generated[0])
            entries.extend(_entries(scores.generated, request.logprobs, decode))
        logprobs = _completion_logprobs(tokens, entries, request.logprobs, _TokenText(codec, request.tokens_as_ids))
    # vLLM stops at EOS with "stop"; at max_tokens 0 with echo it reports on a token it
    # generated and dropped, which this server never generates: "length".
    stopped = bool(generated) and codec is not None and generated[0] == codec.eos_token_id
    return {
        "index": index,
        "text": _choice_text(request, index, generated, codec),
        "logprobs": logprobs,
        "finish_reason": "stop" if stopped else "length",
        "stop_reason": None,
        "token_ids": generated if request.return_token_ids else None,
        "prompt_logprobs": prompt_entries,
        "prompt_token_ids": list(prompt) if request.return_token_ids else None,
    }


def completion_response(request: CompletionRequest, results: Sequence[PromptScores], served: ServedModel,
                        codec: Optional[TextCodec]) -> dict[str, Any]:
    """The `POST /v1/completions` response body, one choice per prompt, in vLLM's format."""
    choices = [_choice(request, index, scores, codec) for index, scores in enumerate(results)]
    prompt_tokens = sum(len(prompt) for prompt in request.prompts)
    # vLLM counts one completion token per prompt even at max_tokens 0 with echo (it
    # generates one and drops it): the same count here, so usage agrees.
    completion_tokens = len(request.prompts)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                      "completion_tokens": completion_tokens}}
