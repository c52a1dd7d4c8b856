"""`python -m megatron_opd.train`: the name the launchers use for `megatron-opd train` (`commands.train`)."""

import sys

from megatron_opd.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
