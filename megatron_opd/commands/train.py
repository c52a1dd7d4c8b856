"""`python -m megatron_opd.train --config X.yaml [key=value ...]`: distillation training.

Launch with torchrun for several ranks (`torchrun --nproc-per-node N -m megatron_opd.train ...`);
a single process runs as one rank (CPU mode when there is no GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from megatron_opd.checkpoint.megatron_checkpoint import CheckpointMismatchError
from megatron_opd.config.job import load_job_config
from megatron_opd.config.schema import ConfigError
from megatron_opd.rollout import VLLMError
from megatron_opd.teachers import TeacherServerError
from megatron_opd.trainer.trainer import Trainer


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron_opd.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML training config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. beta=0 training.train_iters=10")
    args = parser.parse_args(argv)
    try:
        config = load_job_config(args.config, args.overrides)
        trainer = Trainer(config)
        try:
            result = trainer.train()
        finally:
            trainer.close()
    except (ConfigError, FileNotFoundError, FileExistsError, TeacherServerError, VLLMError,
            CheckpointMismatchError) as error:
        print(f"megatron_opd.train: error: {error}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(f"done: iteration {result['iteration']}, checkpoint {result['checkpoint']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
