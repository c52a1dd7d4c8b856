"""Record real vLLM answers as the JSON fixtures under tests/fixtures/vllm.

    .venv/bin/python tools/record_vllm_fixtures.py            # needs vLLM (`make vllm-setup`)

Serves the tie variant of the quickstart teacher (tests/helpers/vllm_fixtures.py) with
`vllm serve` (fp32, eager, CPU build), sends each request below, and writes one file per
exchange plus manifest.json (vLLM's version and the server's settings). The default test
suite, which has no vLLM, reads them: tests/test_vllm_fixtures.py checks our client's
parser against vLLM's answers and our server's answers against vLLM's, request by request.

The tool checks that the answers show what each fixture is for (a tie at the K-th value,
a prompt token outside the top-K, ...) and fails instead of writing a fixture that does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.vllm_fixtures import (  # noqa: E402
    FIXTURES,
    MAX_LOGPROBS,
    MAX_MODEL_LEN,
    SERVED_NAME,
    TIE_COPY_OF,
    TIE_ROW,
    make_tie_teacher,
    request_body,
    task_ids,
)
from tests.helpers.vllm_server import get_json, post_json, require_vllm, vllm_server  # noqa: E402

TIE_K = 1  # at position 1 of "1?" the shipped teacher ranks the tied pair ("1" and <unk>) 1 and 2: K=1 splits it


def completion(name: str, what: str, **body) -> dict:
    return {"name": name, "what": what,
            "request": {"method": "POST", "path": "/v1/completions", "body": {"model": SERVED_NAME, **body}}}


def exchanges() -> list[dict]:
    """The requests, each with what it records."""
    return [
        {"name": "models", "what": "GET /v1/models: max_model_len per model", "request": {"method": "GET",
                                                                                          "path": "/v1/models"}},
        completion("topk", "prompt_logprobs=3, the request ServerTeacher sends: each entry the actual token "
                   "first (its true rank), then ranks 1..3; some actual tokens are outside the top 3",
                   prompt=task_ids("12+34=46"), max_tokens=1, temperature=0, prompt_logprobs=3),
        # Which of the tied pair vLLM's top-K keeps is its torch.topk's choice: both are asked,
        # `name_ties` names them by the answer.
        *[completion(f"tie_{token}", f"position 1 of [3, {token}, 12]: token {TIE_COPY_OF} (\"1\") and <unk> "
                     f"({TIE_ROW}, a copy of its LM-head row) tie at ranks {TIE_K} and {TIE_K + 1}; K={TIE_K}",
                     prompt=[3, token, 12], max_tokens=1, temperature=0, prompt_logprobs=TIE_K)
          for token in (TIE_ROW, TIE_COPY_OF)],
        completion("echo_max_tokens_0", "echo=true with max_tokens=0 (axolotl's online KD): prompt scored, "
                   "nothing generated", prompt=task_ids("5+7="), max_tokens=0, echo=True, prompt_logprobs=3,
                   temperature=0),
        completion("echo_logprobs", "echo=true, max_tokens=0, logprobs=2: the logprobs object over the prompt "
                   "(prompt_logprobs defaults to logprobs)", prompt=task_ids("6+25="), max_tokens=0, echo=True,
                   logprobs=2),
        completion("generated_logprobs", "logprobs=3 of the one generated (greedy) token",
                   prompt=task_ids("6+25="), max_tokens=1, temperature=0, logprobs=3),
        completion("full_vocab", f"prompt_logprobs=-1: the whole vocab (15 <= --max-logprobs {MAX_LOGPROBS})",
                   prompt=task_ids("70+"), max_tokens=1, temperature=0, prompt_logprobs=-1),
        completion("text_prompt", "a text prompt with prompt_logprobs=0 (ServerTeacher's tokenizer probe): "
                   "each entry holds only the prompt token", prompt="12+34=", max_tokens=1, temperature=0,
                   prompt_logprobs=0),
        completion("return_token_ids", "return_token_ids=true: token_ids and prompt_token_ids",
                   prompt=task_ids("99+1="), max_tokens=1, temperature=0, return_token_ids=True),
        completion("error_max_tokens_0_without_echo", "max_tokens=0 without echo is a 400",
                   prompt=task_ids("12+3="), max_tokens=0, prompt_logprobs=1),
        completion("error_prompt_logprobs_above_max", "prompt_logprobs above --max-logprobs is a 400",
                   prompt=task_ids("12+3="), max_tokens=1, prompt_logprobs=MAX_LOGPROBS + 1),
        completion("error_logprobs_above_max", "logprobs above --max-logprobs is a 400",
                   prompt=task_ids("12+3="), max_tokens=1, logprobs=MAX_LOGPROBS + 1),
        completion("error_prompt_logprobs_negative", "prompt_logprobs below -1 is a 400",
                   prompt=task_ids("12+3="), max_tokens=1, prompt_logprobs=-2),
        completion("error_prompt_fills_context", f"a prompt of max_model_len={MAX_MODEL_LEN} tokens leaves no room "
                   "for the output token: a 400", prompt=[3] * MAX_MODEL_LEN, max_tokens=1, prompt_logprobs=1),
        {"name": "error_nested_json", "what": "a body nested 5000 lists deep is a 400, not a 500",
         "request": {"method": "POST", "path": "/v1/completions", "nested_depth": 5000}},
    ]


def send(url: str, exchange: dict) -> dict:
    request = exchange["request"]
    if request["method"] == "GET":
        status, response = get_json(url + request["path"])
    else:
        status, response = post_json(url + request["path"], request_body(exchange))
    return {**exchange, "status": status, "response": response}


def entry(recorded: dict, position: int) -> dict:
    return recorded["response"]["choices"][0]["prompt_logprobs"][position]


def name_ties(recorded: dict[str, dict]) -> dict[str, dict]:
    """`tie_outside`: the answer whose actual token ties the K-th value and is not in the top K
    (vLLM lists it first, rank K + 1); `tie_inside`: the one whose actual token is the K-th."""
    ties = [recorded.pop(f"tie_{token}") for token in (TIE_ROW, TIE_COPY_OF)]
    outside = [tie for tie in ties if len(entry(tie, 1)) == TIE_K + 1]
    assert len(outside) == 1, f"expected one of the tied pair outside the top {TIE_K}: {[entry(t, 1) for t in ties]}"
    inside = next(tie for tie in ties if tie is not outside[0])
    for name, tie, where in (("tie_outside", outside[0], "is not in the top K: vLLM lists it first with rank K + 1"),
                             ("tie_inside", inside, "is the K-th: listed first with rank K")):
        actual = tie["request"]["body"]["prompt"][1]
        recorded[name] = {**tie, "name": name, "what": f"{tie['what']}; the actual token {actual} {where}"}
    return recorded


def check(recorded: dict[str, dict]) -> None:
    """Each fixture shows what it is for; AssertionError otherwise."""
    for name, exchange in recorded.items():
        expected = 400 if name.startswith("error_") else 200
        assert exchange["status"] == expected, (name, exchange["response"])
    for name, rank in (("tie_outside", TIE_K + 1), ("tie_inside", TIE_K)):
        actual = str(recorded[name]["request"]["body"]["prompt"][1])
        tied = entry(recorded[name], 1)
        assert list(tied)[0] == actual and tied[actual]["rank"] == rank, (name, tied)
        kth = next(item for item in tied.values() if item["rank"] == TIE_K)
        assert kth["logprob"] == tied[actual]["logprob"], f"{name}: no tie at the K-th value: {tied}"
    other = entry(recorded["tie_outside"], 1)
    assert str(TIE_COPY_OF if list(other)[0] == str(TIE_ROW) else TIE_ROW) in other
    topk = recorded["topk"]["response"]["choices"][0]["prompt_logprobs"]
    assert any(len(item) == 4 for item in topk[1:]), "no actual token outside the top 3 in `topk`"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args(argv)
    version = require_vllm()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tie_teacher(Path(tmp) / "teacher")
        with vllm_server(model, max_logprobs=MAX_LOGPROBS, max_model_len=MAX_MODEL_LEN,
                         served_model_name=SERVED_NAME, log_path=Path(tmp) / "vllm.log") as server:
            recorded = {exchange["name"]: send(server.url, exchange) for exchange in exchanges()}
    recorded = name_ties(recorded)
    check(recorded)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"vllm_version": version, "model": "megatron_opd/quickstart/teacher",
                "tie": {"row": TIE_ROW, "copy_of": TIE_COPY_OF}, "served_model_name": SERVED_NAME,
                "max_logprobs": MAX_LOGPROBS, "max_model_len": MAX_MODEL_LEN, "dtype": "float32",
                "recorded_by": "tools/record_vllm_fixtures.py"}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for name, exchange in recorded.items():
        (args.out / f"{name}.json").write_text(json.dumps(exchange, indent=1) + "\n")
    print(f"wrote {len(recorded)} fixtures and manifest.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
