"""`megatron-opd serve-teacher`: a Megatron model behind vLLM's OpenAI-style completions API.

    megatron-opd serve-teacher --model DIR [--port 8000] [--max-logprobs 20] [--dtype auto|fp32|bf16] ...
    torchrun --nproc-per-node N -m megatron_opd.commands.serve_teacher --tp N --model DIR ...

DIR is an HF model directory or a megatron_opd checkpoint. Distillation asks it for
the teacher's top-K prompt log-probs of each sequence, exactly as it would ask
`vllm serve DIR --max-logprobs K`: `POST /v1/completions` with `prompt_logprobs`,
`GET /v1/models`, `GET /health` (the API itself: `serve/api.py`, the HTTP server
`serve/server.py`). Once the server accepts requests it prints one line,
`serving NAME on http://HOST:PORT`, on stdout.

SIGTERM or SIGINT on rank 0: new requests get 503, every accepted one is answered,
then rank 0 sends STOP to the other ranks and all exit 0. The other ranks ignore
these signals (torchrun signals every rank) and wait for that STOP.
"""


from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_opd.checkpoint.megatron_checkpoint import DTYPES
from megatron_opd.checkpoint.pretrained import Pretrained, inspect_pretrained, load_pretrained
from megatron_opd.commands.errors import add_debug_flag, run_command
from megatron_opd.config.errors import UserError
from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.runtime import destroy_runtime, initialize_runtime, resolve_device
from megatron_opd.runtime.progress import log
from megatron_opd.serve.api import ServedModel
from megatron_opd.serve.engine import BatchChannel, TeacherEngine, follow
from megatron_opd.serve.scheduler import BatchScheduler
from megatron_opd.serve.server import TeacherHTTPServer, TeacherService
from megatron_opd.serve.tokenizer import TOKENIZER_FILES, has_tokenizer, load_codec

DRAIN_S = 10.0  # how long a stopping server waits for handler threads still writing responses
_DTYPE_CHOICES = ("auto", "fp32", "bf16")


class UsageError(UserError, ValueError):
    """A command-line value that cannot work; reported with exit code 1 before anything loads."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-opd serve-teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="HF model directory or megatron_opd checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--max-logprobs", type=int, default=20,
                        help="K: the most prompt_logprobs / logprobs a request may ask for (default 20, as vLLM)")
    parser.add_argument("--dtype", choices=_DTYPE_CHOICES, default="auto",
                        help="weights' dtype (auto: the checkpoint's on GPU, fp32 on CPU)")
    parser.add_argument("--served-model-name", help="the model's name in the API (default: --model as given)")
    parser.add_argument("--tokenizer", type=Path,
                        help="directory of the HF tokenizer, for text prompts and decoded tokens "
                             "(default: the model's own files, `hf/` in a megatron_opd checkpoint; none: ids only)")
    parser.add_argument("--max-model-len", type=int,
                        help="longest prompt in tokens (default and maximum: the model's max_position_embeddings)")
    parser.add_argument("--max-batch-tokens", type=int, default=16384,
                        help="padded tokens (prompts x longest prompt) per forward (default 16384)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a batch waits for more prompts after its first (default 5)")
    parser.add_argument("--max-request-bytes", type=int, default=64 * 2**20,
                        help="largest request body (default 64 MiB)")
    parser.add_argument("--max-prompts-per-request", type=int, default=1024,
                        help="most prompts in one request (default 1024)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size: the number of torchrun ranks")
    parser.add_argument("--heartbeat-s", type=float, default=30.0,
                        help="at TP > 1, seconds between rank 0's broadcasts when idle, so that the other "
                             "ranks' waiting collective never times out (default 30; the timeout is 30 min)")
    add_debug_flag(parser)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for flag, value, low in (("--max-logprobs", args.max_logprobs, 1), ("--tp", args.tp, 1),
                             ("--max-batch-tokens", args.max_batch_tokens, 1),
                             ("--max-request-bytes", args.max_request_bytes, 1),
                             ("--max-prompts-per-request", args.max_prompts_per_request, 1),
                             ("--batch-wait-ms", args.batch_wait_ms, 0), ("--heartbeat-s", args.heartbeat_s, 0.01)):
        if not value >= low:
            raise UsageError(f"{flag} {value} is invalid: must be >= {low}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is invalid: 0 (any free port) to 65535")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp:
        hint = (f"launch with `torchrun --nproc-per-node {args.tp} -m megatron_opd.commands.serve_teacher --tp {args.tp} ...`"
                if world == 1 else f"pass --tp {world}: only tensor parallelism is supported (no PP or DP)")
        raise UsageError(f"--tp {args.tp} needs {args.tp} process(es), this run has WORLD_SIZE={world}: {hint}")


def _served_model(args: argparse.Namespace, source: Pretrained) -> ServedModel:
    model = source.model
    if args.max_logprobs > model.vocab_size:
        raise UsageError(f"--max-logprobs {args.max_logprobs} is invalid: at most the vocab size {model.vocab_size}")
    max_model_len = args.max_model_len or model.max_position_embeddings
    if not 1 <= max_model_len <= model.max_position_embeddings:
        raise UsageError(f"--max-model-len {max_model_len} is invalid: 1 to the model's "
                         f"max_position_embeddings={model.max_position_embeddings}")
    return ServedModel(name=args.served_model_name or str(args.model), root=str(args.model),
                       max_model_len=max_model_len, vocab_size=model.vocab_size, max_logprobs=args.max_logprobs,
                       max_prompts_per_request=args.max_prompts_per_request,
                       tokenizer_note=f"this server has no tokenizer (none in {_tokenizer_dir(args, source)})")


def _tokenizer_dir(args: argparse.Namespace, source: Pretrained) -> Path:
    """--tokenizer, else where a pretrained model keeps its tokenizer: `hf/` inside a megatron_opd checkpoint."""
    if args.tokenizer is not None:
        if not has_tokenizer(args.tokenizer):
            raise UsageError(f"--tokenizer {args.tokenizer} holds no tokenizer files (any of {list(TOKENIZER_FILES)})")
        return args.tokenizer
    return source.tokenizer_dir


def _weights_dtype(choice: str, source: Pretrained, device_type: str) -> torch.dtype:
    if choice != "auto":
        return DTYPES[choice]
    # CPU mode runs float32 in practice (README); on GPU keep what the checkpoint stores.
    if device_type == "cpu" or source.dtype not in (torch.bfloat16, torch.float16):
        return torch.float32
    return source.dtype


def _listen(args: argparse.Namespace) -> TeacherHTTPServer:
    try:
        return TeacherHTTPServer(args.host, args.port, args.max_request_bytes)
    except OSError as error:
        raise UsageError(f"cannot listen on --host {args.host} --port {args.port}: {error}") from None


def _exit_with_launcher() -> None:
    """Under torchrun: end this rank when torchrun is gone. Killed with SIGKILL, torchrun
    cannot end its ranks (each runs in a session of its own), which would leave rank 0
    serving alone and the others waiting on it until the collective timeout."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        print(f"serve-teacher: rank {os.environ.get('RANK')}: torchrun (pid {launcher}) is gone, exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()


def _skip_final_collection() -> None:
    """Exempt every live object from the garbage collector before the interpreter exits.

    Its final collections walk everything torch, Megatron and transformers created: 1.3 s
    for one process, ~4 s per rank at TP=2 on two cores, measured. Nothing there needs a
    finalizer the OS would not provide, and a stopped server should be gone promptly.
    """
    gc.freeze()


def _log(message: str) -> None:
    log(f"serve-teacher: {message}")


def serve(args: argparse.Namespace) -> int:
    """Check everything, load the model, serve until SIGTERM/SIGINT; the exit code.

    Meant as the process's last act: it ends by exempting all objects from the garbage
    collector (`_skip_final_collection`)."""
    _check_args(args)
    source = inspect_pretrained(args.model)
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp)
    source.model.check_parallel(parallel)
    served = _served_model(args, source)
    rank = int(os.environ.get("RANK", "0"))
    if args.tp > 1:
        _exit_with_launcher()
    codec = load_codec(_tokenizer_dir(args, source)) if rank == 0 else None
    # Bind before the (long) load so that a busy port fails now; connections made during
    # the load wait in the backlog and are answered once the model is ready.
    httpd = _listen(args) if rank == 0 else None
    dtype = _weights_dtype(args.dtype, source, resolve_device())
    runtime = initialize_runtime(parallel)
    _log(f"loading {source.kind} model {args.model} ({source.family}, {source.model.num_layers} layers) "
         f"at tp={args.tp}, {dtype}")
    model = load_pretrained(source, runtime, role="teacher", dtype=dtype)
    engine = TeacherEngine(model, source.model.vocab_size, runtime.device)
    channel = BatchChannel(runtime)
    if rank != 0:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)  # rank 0 decides when to stop and says so
        follow(channel, engine)
        destroy_runtime()
        _skip_final_collection()
        return 0

    scheduler = BatchScheduler(engine, channel, args.max_batch_tokens, args.batch_wait_ms / 1000, args.heartbeat_s)
    httpd.attach(TeacherService(served, scheduler, codec))

    def request_stop(signum: int, frame) -> None:
        scheduler.stop_requested = True  # only a flag: the loop may hold the queue's locks

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    threading.Thread(target=httpd.serve_forever, args=(0.1,), name="http", daemon=True).start()
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {served.name} on http://{host}:{httpd.port}", flush=True)
    if codec is None:
        _log(f"no tokenizer in {_tokenizer_dir(args, source)}: token-id prompts only")
    scheduler.run()
    if not httpd.wait_idle(DRAIN_S):
        _log(f"stopping with requests still open after {DRAIN_S:.0f}s")
    httpd.shutdown()
    httpd.server_close()
    destroy_runtime()
    _log(f"stopped after {scheduler.batches} batches of {scheduler.prompts} prompts")
    _skip_final_collection()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="serve-teacher: %(message)s")
    return run_command("megatron-opd serve-teacher", lambda: serve(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
