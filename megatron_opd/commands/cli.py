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


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: megatron-opd {{{','.join(COMMANDS)}}} ...   (megatron-opd COMMAND --help for its options)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage, file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
