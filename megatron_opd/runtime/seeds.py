"""Every random draw of a run derived from `parallel.seed` and the step, in one place.

A step's randomness is a pure function of (seed, iteration, ...): every rank computes the
same value without communicating, and a resumed run repeats it with no RNG state saved.

    step_seed(seed, i)            torch / numpy / Megatron generators at the start of step i
    step_uniform(seed, name, i)   one uniform draw in [0, 1) per step and purpose (GKD's lmbda)
    sample_seed(seed, i, p)       the sampling stream of the example at position p of step i's
                                  global batch: independent of DP split, microbatching, TP/PP
"""

from __future__ import annotations

import hashlib
import random


def step_seed(seed: int, iteration: int) -> int:
    return seed + 1000 * iteration


def step_uniform(seed: int, name: str, iteration: int) -> float:
    return random.Random(f"{name}/{seed}/{iteration}").random()


def sample_seed(seed: int, iteration: int, position: int) -> int:
    digest = hashlib.blake2b(f"sample/{seed}/{iteration}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
