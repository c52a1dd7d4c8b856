#!/usr/bin/env python
"""HF <-> Megatron checkpoint conversion; the same as `megatron-opd convert`.

    python tools/convert_checkpoint.py hf-to-megatron --hf-path Qwen2.5-0.5B --out ckpt/qwen-0.5b
    torchrun --nproc-per-node 4 tools/convert_checkpoint.py megatron-to-hf \
        --megatron-path ckpt/qwen-0.5b --out hf/qwen-0.5b --tp 2 --pp 2
"""

import sys

from megatron_opd.commands.convert import main

if __name__ == "__main__":
    sys.exit(main())
