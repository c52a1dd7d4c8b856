"""vLLM's recorded answers (tests/fixtures/vllm, written by tools/record_vllm_fixtures.py) and the
model they were recorded on.

The model is the quickstart teacher (megatron_opd/quickstart/teacher: 15 tokens, 64
positions, so answers stay a few KB) with one change that makes ties certain: the LM-head
row of token `TIE_ROW` (`<unk>`, never in a prompt of the task) is a copy of token
`TIE_COPY_OF`'s, so the two always have the same logit. `make_tie_teacher` writes it; the
recording tool serves it with vLLM, the default suite with our server, and both answer
the same requests.

Each fixture is one exchange: `{"name", "what", "request": {"method", "path", "body" |
"nested_depth"}, "status", "response"}`; `nested_depth` stands for a body of that many
nested lists, too large to store.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "vllm"
QUICKSTART_TEACHER = ROOT / "megatron_opd" / "quickstart" / "teacher"
TIE_ROW, TIE_COPY_OF = 14, 3  # <unk> gets the LM-head row of "1"
SERVED_NAME = "quickstart-teacher-tie"
MAX_LOGPROBS = 15  # the whole vocab: prompt_logprobs -1 is allowed
MAX_MODEL_LEN = 64
# Fields of vLLM's answers that this server does not send (transfer, metrics, MoE routing).
VLLM_ONLY_FIELDS = {"service_tier", "system_fingerprint", "kv_transfer_params", "ec_transfer_params", "metrics",
                    "routed_experts", "prompt_tokens_details", "completion_tokens_details"}


def make_tie_teacher(directory: Path) -> Path:
    """The quickstart teacher with LM-head row TIE_ROW := row TIE_COPY_OF, written to `directory`."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(QUICKSTART_TEACHER, directory, dirs_exist_ok=True)
    weights = load_file(str(QUICKSTART_TEACHER / "model.safetensors"))
    head = weights["lm_head.weight"].clone()
    head[TIE_ROW] = head[TIE_COPY_OF]
    weights["lm_head.weight"] = head
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    assert torch.equal(head[TIE_ROW], head[TIE_COPY_OF])
    return directory


def task_ids(text: str) -> list[int]:
    """The quickstart tokenizer's ids of a task string: "0".."9" are 2..11, "+" 12, "=" 13."""
    vocab = {str(digit): digit + 2 for digit in range(10)} | {"+": 12, "=": 13}
    return [vocab[char] for char in text]


def request_body(fixture: dict) -> Any:
    """The body the fixture's request sent: a JSON object, or the bytes of a nested body."""
    request = fixture["request"]
    if "nested_depth" in request:
        depth = request["nested_depth"]
        return b'{"prompt": [3, 4], "x": ' + b"[" * depth + b"]" * depth + b"}"
    return request.get("body")


def load_fixtures() -> dict[str, dict]:
    """Every recorded exchange by name (manifest.json aside)."""
    fixtures = {}
    for path in sorted(FIXTURES.glob("*.json")):
        if path.name != "manifest.json":
            fixture = json.loads(path.read_text())
            fixtures[fixture["name"]] = fixture
    return fixtures


def manifest() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())
