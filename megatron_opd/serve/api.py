"""The OpenAI-style completions API as vLLM serves it: request validation and response bodies.

Pure Python, no torch and no HTTP: `server.py` hands the raw body bytes in and writes the
dicts returned here out as JSON. Every rejected request raises `ApiError`, whose message
names the field and the allowed values, and whose status and JSON body follow OpenAI's
(and vLLM's) error format:

    {"error": {"message": "...", "type": "BadRequestError", "param": "max_tokens", "code": 400}}

What a completions request may ask of this server (anything else is a 400 naming the
field; fields this module does not know are ignored, since OpenAI clients send extras):

- `prompt`: token ids `[int, ...]`, a string, or a list of either (one choice each).
- `prompt_logprobs`: null or 0..K: per prompt token, the top-k of the teacher's
  distribution before it plus the token itself (vLLM's `prompt_logprobs`).
- `max_tokens`: 0 or 1; `logprobs`: null or 0..K for that one generated token;
  `temperature` >= 0 (0 is greedy) and `seed` for its sampling.
- `echo`, `stream`, `n`, `best_of` only at their defaults; sampling knobs this server
  does not implement (`top_p`, `top_k`, penalties, ...) only at their neutral values.
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
    from megatron_opd.serve.engine import PromptScores

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
                411: "LengthRequiredError", 413: "RequestTooLargeError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

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

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

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
        """The model's entry in `GET /v1/models`."""
        return {"id": self.name, "object": "model", "created": int(time.time()), "owned_by": "megatron_opd",
                "root": self.root, "parent": None, "max_model_len": self.max_model_len,
                "vocab_size": self.vocab_size, "max_logprobs": self.max_logprobs}


@dataclass(frozen=True)
class CompletionRequest:
    """A validated completions request: its prompts as token ids and what to return for each."""

    prompts: list[list[int]]
    prompt_logprobs: Optional[int]  # None: no prompt_logprobs in the response
    logprobs: Optional[int]  # None: no logprobs object for the generated token
    max_tokens: int  # 0 or 1
    temperature: float
    seed: int  # drawn at random when the request gave none, so all TP ranks share it


def _show(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."



def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (400 otherwise; NaN and Infinity are not JSON)."""
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"request body is not valid JSON: {error}") from None
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


def _only_default(body: dict, field: str, defaults: tuple, allowed: str) -> None:
    value = body.get(field)
    if value is not None and (isinstance(value, bool) != isinstance(defaults[0], bool) or value not in defaults):
        raise bad_request(f"{field}={_show(value)} is not supported: only {allowed}", field)


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
    if len(ids) > served.max_model_len:
        raise bad_request(f"prompt {index} has {len(ids)} tokens, more than max_model_len="
                          f"{served.max_model_len}", "prompt")
    return ids


def _prompts(body: dict, served: ServedModel, codec: Optional[TextCodec]) -> list[list[int]]:
    """`prompt` as a list of token-id lists: one prompt (ids or text) or a list of them."""
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
    add_special_tokens = body.get("add_special_tokens", True)
    if not isinstance(add_special_tokens, bool):
        raise bad_request(f"add_special_tokens={_show(add_special_tokens)} is invalid: true or false",
                          "add_special_tokens")
    return [_prompt_ids(p, i, served, codec, add_special_tokens) for i, p in enumerate(prompts)]


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
    k = served.max_logprobs
    within_k = f"null or an integer in [0, {k}] (this server runs with --max-logprobs {k})"
    prompt_logprobs = _int_field(request, "prompt_logprobs", 0, k, None, within_k)
    logprobs = _int_field(request, "logprobs", 0, k, None, within_k)
    max_tokens = _int_field(request, "max_tokens", 0, 1, 1,
                            "0 or 1 (this server scores prompts; it generates at most one token)")
    temperature = _temperature(request)
    seed = _int_field(request, "seed", INT64_MIN, INT64_MAX, None, "null or a 64-bit signed integer")
    _only_default(request, "echo", (False,), "false (prompt_logprobs gives the prompt's log-probs)")
    _only_default(request, "stream", (False,), "false (one JSON response per request)")
    _only_default(request, "n", (1,), "1 (one completion per prompt)")
    _only_default(request, "best_of", (1,), "1 (one completion per prompt)")
    for field, neutral in _NEUTRAL_SAMPLING.items():
        _only_default(request, field, neutral, f"null or {_show(neutral[0])} (the one token is sampled from "
                                               "the model's distribution at `temperature`)")
    return CompletionRequest(
        prompts=_prompts(request, served, codec), prompt_logprobs=prompt_logprobs, logprobs=logprobs,
        max_tokens=max_tokens, temperature=temperature,
        seed=seed if seed is not None else secrets.randbits(63))


# ---------------------------------------------------------------------------- responses


def _decoder(codec: Optional[TextCodec]) -> Callable[[int], Optional[str]]:
    return codec.decode_token if codec is not None else (lambda token_id: None)


def _logprob_entries(top_ids: Sequence[int], top_values: Sequence[float], token: int, token_logprob: float,
                     decode: Callable[[int], Optional[str]]) -> dict[str, dict[str, Any]]:
    """One position's `{"<id>": {"logprob", "rank", "decoded_token"}}`: the top-k with ranks
    1..k, and `token` (the actual next token) with rank null when it is not among them."""
    entry = {str(i): {"logprob": value, "rank": rank, "decoded_token": decode(i)}
             for rank, (i, value) in enumerate(zip(top_ids, top_values), start=1)}
    entry.setdefault(str(token), {"logprob": token_logprob, "rank": None, "decoded_token": decode(token)})
    return entry


def _prompt_logprobs(prompt: list[int], scores: PromptScores, k: int, decode) -> list[Optional[dict]]:
    """vLLM's `prompt_logprobs`: None for the first token, then one entry per prompt token."""
    top = scores.prompt
    entries: list[Optional[dict]] = [None]
    for position, (ids, values, token_logprob) in enumerate(
            zip(top.ids[:, :k].tolist(), top.logprobs[:, :k].tolist(), top.token_logprobs.tolist()), start=1):
        entries.append(_logprob_entries(ids, values, prompt[position], token_logprob, decode))
    return entries


def _completion_logprobs(scores: PromptScores, k: int, decode) -> dict[str, list]:
    """OpenAI's completions `logprobs` object for the one generated token; tokens and the
    keys of `top_logprobs` are decimal token ids, as in `prompt_logprobs`."""
    top = scores.generated
    token, token_logprob = int(top.token_ids[0]), float(top.token_logprobs[0])
    entry = _logprob_entries(top.ids[0, :k].tolist(), top.logprobs[0, :k].tolist(), token, token_logprob, decode)
    return {"tokens": [str(token)], "token_logprobs": [token_logprob],
            "top_logprobs": [{key: value["logprob"] for key, value in entry.items()}], "text_offset": [0]}


def completion_response(request: CompletionRequest, results: Sequence[PromptScores], served: ServedModel,
                        codec: Optional[TextCodec]) -> dict[str, Any]:
    """The `POST /v1/completions` response body, one choice per prompt, in vLLM's format."""
    decode = _decoder(codec)
    choices = []
    for index, (prompt, scores) in enumerate(zip(request.prompts, results)):
        generated = [] if scores.generated is None else [int(scores.generated.token_ids[0])]
        choices.append({
            "index": index,
            "text": codec.decode_token(generated[0]) if codec is not None and generated else "",
            "token_ids": generated,
            "logprobs": (_completion_logprobs(scores, request.logprobs, decode)
                         if request.logprobs is not None and generated else None),
            "finish_reason": "length",
            "stop_reason": None,
            "prompt_logprobs": (_prompt_logprobs(prompt, scores, request.prompt_logprobs, decode)
                                if request.prompt_logprobs is not None else None),
        })
    prompt_tokens = sum(len(prompt) for prompt in request.prompts)
    completion_tokens = request.max_tokens * len(request.prompts)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
