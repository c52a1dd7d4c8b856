"""`megatron-opd <command>`: the command-line entry point.

    megatron-opd convert hf-to-megatron | megatron-to-hf | verify ...
    megatron-opd train --config X.yaml [key=value ...]
    megatron-opd serve-teacher --model DIR --port P --max-logprobs K ...
    megatron-opd cache-teacher --config X.yaml --out DIR [key=value ...]
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

# Imported only when chosen: `--help` of one command does not load every room.
COMMANDS = {"convert": "megatron_opd.commands.convert", "train": "megatron_opd.commands.train",
            "serve-teacher": "megatron_opd.commands.serve_teacher",
            "cache-teacher": "megatron_opd.commands.cache_teacher"}
# What `megatron-opd --help` says of each command (the commands themselves are not imported for it).
SUMMARIES = {
    "convert": "convert checkpoints HF <-> Megatron (at any TP/PP) and verify a conversion",
    "train": "train a student (GKD, OPD-RL, OPSD, SFT) from YAML + key=value; --print-config: every key",
    "serve-teacher": "serve a model's top-K prompt log-probs over vLLM's OpenAI-style API (a remote teacher)",
    "cache-teacher": "store the teacher's top-K log-probs over the dataset once, for off-policy GKD without it",
}

def help_text() -> str:
    """The usage line, then each command with what it does."""
    width = max(map(len, COMMANDS)) + 2
    lines = [f"usage: megatron-opd {{{','.join(COMMANDS)}}} ...   (megatron-opd COMMAND --help for its options)",
             "", "Knowledge distillation (GKD, OPD-RL, OPSD) on Megatron-Core.", "", "commands:"]
    lines += [f"  {name:<{width}}{SUMMARIES[name]}" for name in COMMANDS]
    lines += ["", "Also: python -m megatron_opd.quickstart (a tiny CPU distillation run, end to end)."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(help_text(), file=sys.stderr)
        if argv:
            print(f"megatron-opd: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
