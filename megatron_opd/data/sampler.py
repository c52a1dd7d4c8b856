"""Which rows each global batch holds: a seeded, resumable order over epochs.

Written by hand rather than with torch's samplers: a DistributedSampler reshuffles only
when told the epoch and cannot resume in the middle of one, while resuming a run must
give exactly the batches the uninterrupted run would have had. Here the order of epoch e
is a pure function of (seed, e), and the state is two integers.
"""

from __future__ import annotations

from typing import Any, Iterator, Sized, Union

import numpy as np


class DataIterator(Iterator[list[int]]):
    """Yields, step after step, the dataset indices of one global batch (`global_batch_size`
    indices), forever.

    Epoch e visits the rows in the order `permutation(seed, e)` (numpy's PCG64 seeded with
    [seed, e]; the identity when `shuffle` is False) in consecutive batches. The last
    `len % global_batch_size` rows of an epoch's order are dropped (drop-last: every batch
    is full, and a batch never spans two epochs); a reshuffle gives them their chance in
    later epochs.

    Resume: `state_dict()` after k steps, a new iterator, `load_state_dict()`, and the next
    batches are those of the uninterrupted run's step k + 1, k + 2, ...
    """

    def __init__(self, dataset: Union[Sized, int], global_batch_size: int, seed: int = 42,
                 shuffle: bool = True) -> None:
        self.num_samples = dataset if isinstance(dataset, int) else len(dataset)
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size} is invalid: an integer >= 1")
        if self.num_samples < global_batch_size:
            raise ValueError(f"the dataset has {self.num_samples} rows, fewer than one global batch of "
                             f"{global_batch_size}")
        if seed < 0:
            raise ValueError(f"seed={seed} is invalid: an integer >= 0")
        self.global_batch_size, self.seed, self.shuffle = global_batch_size, seed, shuffle
        self.epoch = 0
        self.position = 0  # index into the epoch's order of the next row to yield
        self.consumed_samples = 0  # rows yielded so far, over all epochs
        self._order_epoch, self._order = -1, np.arange(0)

    def order(self, epoch: int) -> np.ndarray:
        """The visiting order of `epoch`: a permutation of range(len(dataset))."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_samples)

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> list[int]:
        if self.position + self.global_batch_size > self.num_samples:
            self.epoch, self.position = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order_epoch, self._order = self.epoch, self.order(self.epoch)
        batch = self._order[self.position:self.position + self.global_batch_size]
        self.position += self.global_batch_size
        self.consumed_samples += self.global_batch_size
        return [int(index) for index in batch]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "num_samples": self.num_samples, "global_batch_size": self.global_batch_size,
                "consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off. The dataset size, seed and shuffle must match the
        saved ones (else the order would silently differ); the global batch size may change
        (position counts rows, not batches)."""
        for key in ("num_samples", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data order: saved {key}={state[key]!r}, now "
                                 f"{getattr(self, key)!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.consumed_samples = int(state["consumed_samples"])


def local_batch(indices: list[int], data_parallel_rank: int, data_parallel_size: int) -> list[int]:
    """The contiguous share of a global batch that one data-parallel rank trains on."""
    if len(indices) % data_parallel_size:
        raise ValueError(f"a global batch of {len(indices)} does not split over {data_parallel_size} "
                         "data-parallel ranks")
    share = len(indices) // data_parallel_size
    return indices[data_parallel_rank * share:(data_parallel_rank + 1) * share]


__all__ = ["DataIterator", "local_batch"]
