"""`python -m megatron_opd.train --config X.yaml [key=value ...]`: distillation training.

Launch with torchrun for several ranks (`torchrun --nproc-per-node N -m megatron_opd.train ...`);
a single process runs as one rank (CPU mode when there is no GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from megatron_opd.commands.errors import add_debug_flag, run_command
from megatron_opd.config.describe import config_help_epilog, config_text
from megatron_opd.config.job import load_job_config
from megatron_opd.trainer.trainer import Trainer

PROG = "megatron_opd.train"


def train(config_path: Optional[str], overrides: Sequence[str]) -> int:
    config = load_job_config(config_path, overrides)
    trainer = Trainer(config)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    if os.environ.get("RANK", "0") == "0":
        print(f"done: iteration {result['iteration']}, checkpoint {result['checkpoint']}", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=config_help_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML training config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. beta=0 training.train_iters=10")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config (every key: its value, default and documentation) and exit")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.print_config:
        return run_command(PROG, lambda: print(config_text(args.config, args.overrides), end="") or 0,
                           debug=args.debug)
    return run_command(PROG, lambda: train(args.config, args.overrides), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
