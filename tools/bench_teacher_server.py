"""Load test of `megatron-opd serve-teacher`: concurrent clients asking for top-K prompt log-probs.

Writes a random Llama (default: 4 layers, hidden 256, vocab 32000, so the top-K over the
vocab is real work; weights redrawn by `tests.hf_models.randomize` so logits are O(1)),
starts the server on it as a subprocess (`--tp 2`: under torchrun), then `--clients`
threads, each on one keep-alive `http.client` connection, send `--requests` requests in
all: a random id prompt of `--prompt-len` tokens with `prompt_logprobs=--k` and
`max_tokens=1`, as a distillation trainer asks a vLLM teacher. Every response is
checked (status 200, one prompt_logprobs entry per token with K or K+1 ids). Reports
requests/s, prompt tokens/s, latency percentiles, failed requests, and from /health the
batches the server ran and their mean size; writes all of it to `--out` as JSON.
Exits 1 if any request failed or the server did not stop cleanly.

    python tools/bench_teacher_server.py
    python tools/bench_teacher_server.py --tp 2 --clients 32 --prompt-len 512 --out bench_teacher_server_tp2.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def make_model(directory: Path, layers: int, hidden: int, vocab: int, seed: int) -> Path:
    """A random Llama in `directory` (fp32 safetensors, no tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(REPO))  # the test suite's weight redraw: logits of O(1)
    from tests.hf_models import randomize

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=4096, architectures=["LlamaForCausalLM"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    model.save_pretrained(directory)
    return directory


class Client:
    """One keep-alive connection; the latency and outcome of every request it sends."""

    def __init__(self, port: int, k: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        self.k = k
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def send(self, prompt: list[int]) -> None:
        body = json.dumps({"prompt": prompt, "prompt_logprobs": self.k, "max_tokens": 1, "temperature": 1.0,
                           "seed": prompt[0]}).encode()
        started = time.perf_counter()
        try:
            self.connection.request("POST", "/v1/completions", body=body,
                                    headers={"Content-Type": "application/json"})
            response = self.connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as error:
            self.failures.append(f"{type(error).__name__}: {error}")
            self.connection.close()  # reconnects on the next request
            return
        self.latencies.append(time.perf_counter() - started)
        problem = self._check(response.status, payload, len(prompt))
        if problem:
            self.failures.append(problem)

    def _check(self, status: int, payload: bytes, length: int) -> Optional[str]:
        if status != 200:
            return f"status {status}: {payload[:200]!r}"
        entries = json.loads(payload)["choices"][0]["prompt_logprobs"]
        if len(entries) != length or entries[0] is not None:
            return f"{len(entries)} prompt_logprobs entries for a prompt of {length}"
        if any(len(entry) not in (self.k, self.k + 1) for entry in entries[1:]):
            return "an entry without K or K+1 ids"
        return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_load(port: int, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(args.vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    clients = [Client(port, args.k) for _ in range(args.clients)]
    for client in clients:  # warm-up: connect, and the first forward's one-time costs
        client.send(prompts[0])
    for client in clients:
        client.latencies.clear()
    local = threading.local()
    assigned = iter(clients)
    lock = threading.Lock()

    def send(prompt: list[int]) -> None:
        if not hasattr(local, "client"):
            with lock:
                local.client = next(assigned)
        local.client.send(prompt)

    before = health(port)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(send, prompts))
    seconds = time.perf_counter() - started
    after = health(port)
    latencies = [latency for client in clients for latency in client.latencies]
    failures = [failure for client in clients for failure in client.failures]
    batches = after["batches"] - before["batches"]
    latency_ms = {name: 1000 * percentile(latencies, q) for name, q in (("p50", 50), ("p90", 90), ("p99", 99))}
    latency_ms["mean"] = 1000 * statistics.fmean(latencies)
    return {
        "seconds": seconds,
        "requests_per_s": args.requests / seconds,
        "prompt_tokens_per_s": args.requests * args.prompt_len / seconds,
        "latency_ms": latency_ms,
        "failed_requests": len(failures),
        "failures": failures[:10],
        "batches": batches,
        "mean_prompts_per_batch": (after["prompts"] - before["prompts"]) / max(1, batches),
        "max_prompts_per_batch": after["max_batch_prompts"],
        "server_errors": after["errors"] - before["errors"],
    }


def health(port: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/health")
    payload = json.loads(connection.getresponse().read())
    connection.close()
    return payload


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16, help="concurrent keep-alive connections")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    parser.add_argument("--k", type=int, default=20, help="prompt_logprobs per request (and --max-logprobs)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (torchrun ranks)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--model", type=Path, help="serve this model directory instead of a random Llama")
    parser.add_argument("--server-args", default="", help="more server flags, e.g. '--batch-wait-ms 2'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_teacher_server.json"))
    return parser


def main() -> int:
    args = build_parser().parse_args()
    sys.path.insert(0, str(REPO))
    from megatron_opd.serve import start_server

    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.tp)))}
    with tempfile.TemporaryDirectory(prefix="bench_teacher_server_") as workdir:
        if args.model is None:
            made = time.perf_counter()
            args.model = make_model(Path(workdir) / "llama", args.layers, args.hidden, args.vocab, args.seed)
            print(f"random Llama: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab} "
                  f"({time.perf_counter() - made:.1f}s)", file=sys.stderr)
        started = time.perf_counter()
        with start_server(args.model, tp=args.tp, max_logprobs=args.k, args=args.server_args.split(), env=env,
                          startup_timeout=600) as server:
            startup = time.perf_counter() - started
            print(f"{server.url} ready in {startup:.1f}s; {args.requests} requests from {args.clients} clients",
                  file=sys.stderr)
            result = run_load(server.port, args)
            exit_code = server.stop()
    report = {"config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
              "device": os.environ.get("MEGATRON_OPD_DEVICE", "auto"), "startup_s": startup,
              "server_exit_code": exit_code, **result}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    latency = result["latency_ms"]
    print(f"{result['requests_per_s']:.1f} requests/s, {result['prompt_tokens_per_s']:.0f} prompt tokens/s; "
          f"latency p50 {latency['p50']:.1f} ms, p90 {latency['p90']:.1f} ms, p99 {latency['p99']:.1f} ms; "
          f"failed {result['failed_requests']}; "
          f"{result['batches']} batches, {result['mean_prompts_per_batch']:.2f} prompts/batch "
          f"(max {result['max_prompts_per_batch']}); server exit {exit_code}; wrote {args.out}")
    return 0 if result["failed_requests"] == 0 and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
