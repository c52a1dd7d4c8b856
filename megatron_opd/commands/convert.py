"""`megatron-opd convert`: hf-to-megatron, megatron-to-hf and verify.

    megatron-opd convert hf-to-megatron --hf-path DIR --out DIR [--tp N --pp M --ep E] [--dtype bf16|fp16|fp32]
    megatron-opd convert megatron-to-hf --megatron-path DIR --out DIR [--tp N --pp M --ep E] [--dtype ...]
    megatron-opd convert verify --hf-path DIR --megatron-path DIR [--tp N --pp M --ep E]

Single process by default (CPU mode when there is no GPU); for TP/PP > 1 launch
with `torchrun --nproc-per-node TP*PP` (mixture-of-experts models: PP*max(TP, EP*ETP)). Every input is checked before a process
group, a model or an output directory is created, so a bad input leaves the output
untouched and exits non-zero with one line naming the problem (`--debug`: the
traceback). Outputs are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_opd.checkpoint.convert import conversion_layout, expect_kind, hf_to_megatron, megatron_to_hf
from megatron_opd.checkpoint.hf_streamed import streamed_hf_logits
from megatron_opd.checkpoint.megatron_checkpoint import DTYPES
from megatron_opd.checkpoint.pretrained import inspect_pretrained, load_pretrained
from megatron_opd.commands.errors import add_debug_flag, run_command
from megatron_opd.config.model import MAKE_VOCAB_SIZE_DIVISIBLE_BY
from megatron_opd.config.schema import ConfigError
from megatron_opd.pipeline import lm_forward_backward
from megatron_opd.runtime import initialize_runtime
from megatron_opd.runtime.progress import log


@dataclass
class VerifyResult:
    max_abs_diff: float
    scaled_diff: float  # max |diff| / max(1, max |HF logit|)
    top1_agreement: float
    tokens: int

    def passed(self, tolerance: float) -> bool:
        return self.scaled_diff <= tolerance


def verify(hf_path: Path, megatron_path: Path, tp: int = 1, pp: int = 1, seq_length: int = 128,
           batch_size: int = 2, seed: int = 0, ep: int = 1, etp: Optional[int] = None) -> VerifyResult:
    """Logits of the Megatron checkpoint (at tp/pp) against HF transformers on random ids, fp32.

    The HF model runs on the last stage's first rank with one block's weights loaded at a
    time (`streamed_hf_logits`), never the whole model in fp32."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    hf_source = inspect_pretrained(hf_path)
    expect_kind(hf_source, "hf", "--hf-path")
    source = inspect_pretrained(megatron_path)
    expect_kind(source, "megatron", "--megatron-path")
    if hf_source.model.vocab_size != source.model.vocab_size:
        raise ConfigError(f"vocab sizes differ: HF {hf_source.model.vocab_size}, Megatron {source.model.vocab_size}")
    runtime = initialize_runtime(conversion_layout(tp, pp, source, ep, etp))
    model = load_pretrained(source, runtime, role="teacher", dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, source.model.vocab_size, (1, batch_size, seq_length + 1), generator=generator)
    captured = []
    group = parallel_state.get_tensor_model_parallel_group()
    lm_forward_backward(model, tokens, forward_only=True, on_logits=lambda logits: captured.append(
        gather_from_tensor_model_parallel_region(logits, group=group).detach().clone()))
    result = None
    if (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0):
        expected, _ = streamed_hf_logits(hf_path, tokens[0, :, :-1])
        actual = captured[0][..., : source.model.vocab_size].cpu()
        diff = (actual.double() - expected.double()).abs().max().item()
        result = VerifyResult(
            max_abs_diff=diff, scaled_diff=diff / max(1.0, expected.abs().max().item()),
            top1_agreement=(actual.argmax(-1) == expected.argmax(-1)).double().mean().item(),
            tokens=batch_size * seq_length)
    results: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(results, result)
    return next(r for r in results if r is not None)


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-opd convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def layout(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--tp", type=int, default=1, help="tensor-parallel size (torchrun ranks = tp*pp)")
        sub.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
        sub.add_argument("--ep", type=int, default=1,
                         help="expert-parallel size (mixture-of-experts models; must divide the expert count)")
        sub.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)")
        add_debug_flag(sub)

    to_megatron = commands.add_parser("hf-to-megatron", help="HF directory -> Megatron dist-checkpoint")
    to_megatron.add_argument("--hf-path", type=Path, required=True)
    to_megatron.add_argument("--out", type=Path, required=True)
    to_megatron.add_argument("--dtype", choices=sorted(DTYPES), help="default: the HF checkpoint's dtype")
    to_megatron.add_argument("--make-vocab-size-divisible-by", type=int, default=MAKE_VOCAB_SIZE_DIVISIBLE_BY,
                             help=f"pad the vocab to a multiple of this times --tp (default {MAKE_VOCAB_SIZE_DIVISIBLE_BY})")
    to_megatron.add_argument("--force", action="store_true", help="replace a non-empty --out")
    layout(to_megatron)

    to_hf = commands.add_parser("megatron-to-hf", help="Megatron checkpoint -> HF safetensors directory")
    to_hf.add_argument("--megatron-path", type=Path, required=True)
    to_hf.add_argument("--out", type=Path, required=True)
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's dtype")
    to_hf.add_argument("--max-shard-size", type=_size, default="5GB", help="per safetensors file (default 5GB)")
    to_hf.add_argument("--force", action="store_true", help="replace a non-empty --out")
    layout(to_hf)

    check = commands.add_parser("verify", help="compare Megatron and HF logits on random token ids")
    check.add_argument("--hf-path", type=Path, required=True)
    check.add_argument("--megatron-path", type=Path, required=True)
    check.add_argument("--seq-length", type=int, default=128)
    check.add_argument("--batch-size", type=int, default=2)
    check.add_argument("--tolerance", type=float, default=1e-3,
                       help="max |logit diff| / max(1, max |HF logit|) allowed (default 1e-3)")
    layout(check)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "hf-to-megatron":
        hf_to_megatron(args.hf_path, args.out, args.tp, args.pp, args.dtype, args.force,
                       args.make_vocab_size_divisible_by, args.ep, args.etp)
    elif args.command == "megatron-to-hf":
        megatron_to_hf(args.megatron_path, args.out, args.tp, args.pp, args.dtype, args.force,
                       args.max_shard_size, args.ep, args.etp)
    else:
        result = verify(args.hf_path, args.megatron_path, args.tp, args.pp, args.seq_length, args.batch_size,
                        ep=args.ep, etp=args.etp)
        ok = result.passed(args.tolerance)
        log(f"verify: {result.tokens} tokens, max |logit diff| {result.max_abs_diff:.3e} "
            f"(scaled {result.scaled_diff:.3e}, tolerance {args.tolerance:g}), "
            f"top-1 agreement {result.top1_agreement:.4f}: {'OK' if ok else 'FAILED'}")
        return 0 if ok else 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit code 0 on success; a user's mistake (a `UserError`, an OS error about a file) is one
    line on stderr and exit code 1 (`commands.errors`); anything else keeps its traceback."""
    args = build_parser().parse_args(argv)
    return run_command(f"megatron-opd convert {args.command}", lambda: run(args), debug=args.debug)
