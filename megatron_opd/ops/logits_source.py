"""Where the vocab-parallel kernels read logits from: a tensor, or an LM head applied on the fly.

The kernels only ever touch logits one row chunk at a time (`chunk(rows)`) or at a
few ids per row (`at(rows, local_ids)`), and hand back gradients one row chunk at a
time (`add_chunk_grad`). `narrowed(columns)` is the same source on its first columns only
(a shard's real ids, without the vocab padding), whose gradients come back at full width.
`DenseLogits` reads a materialized `[N, V/tp]` tensor. `LinearLogits` computes
`hidden[rows] @ weight.T` for each chunk, so the fused path never holds `[N, V/tp]` for all
N, and turns logit gradients into gradients of the hidden states and the LM-head weight
(cf. Liger's fused linear JSD).
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch

# Elements of one fp32 logits chunk `[rows, V/tp]`: 1M floats = 4 MiB per temporary (the
# forward and backward keep about twenty such temporaries alive at once).
DEFAULT_CHUNK_ELEMENTS = 1 << 20
MIN_LINEAR_CHUNK_ROWS = 64

Rows = Union[slice, torch.Tensor]


class DenseLogits:
    """Logits given as a tensor `[N, V/tp]`."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.tensors = (logits,)
        self.num_rows, self.local_vocab = logits.shape
        self.dtype = logits.dtype
        self.device = logits.device
        self.grad = None
        self.full_columns = self.local_vocab  # what `grads()` pads back to

    def narrowed(self, columns: int) -> "DenseLogits":
        narrow = DenseLogits(self.logits[:, :columns])
        narrow.full_columns = self.full_columns
        return narrow

    def rebuild(self):
        """A constructor that turns `self.tensors` back into an equivalent source."""
        return DenseLogits

    def chunk(self, rows: Rows) -> torch.Tensor:
        return self.logits[rows]

    def at(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """`rows` `[n, 1]`, `local_ids` `[n, K]` -> `[n, K]`."""
        return self.logits[rows, local_ids]

    def read_chunk(self, rows: Rows, out: torch.Tensor) -> torch.Tensor:
        """`chunk(rows)` written into `out` `[rows, V/tp]` (any float dtype): no chunk-sized allocation."""
        if isinstance(rows, slice):
            return out.copy_(self.logits[rows])
        if out.dtype == self.dtype:
            return torch.index_select(self.logits, 0, rows, out=out)
        return out.copy_(self.logits.index_select(0, rows))

    def start_backward(self, dtype: torch.dtype) -> None:
        self.grad = torch.zeros(self.logits.shape, dtype=dtype, device=self.device)

    def start_grad_writes(self, compute_dtype: torch.dtype, every_row: bool) -> None:
        """For `write_chunk_grad`: the gradient in the logits' dtype (each row is rounded once, as
        `grads()` would), uninitialized when every row will be written."""
        make = torch.empty if every_row else torch.zeros
        self.grad = make(self.logits.shape, dtype=self.dtype, device=self.device)

    def add_chunk_grad(self, rows: Rows, grad: torch.Tensor) -> None:
        self.grad[rows] += grad

    def write_chunk_grad(self, rows: Rows, grad: torch.Tensor) -> None:
        """The whole gradient of these rows (each row written once)."""
        if isinstance(rows, slice):
            self.grad[rows].copy_(grad)
        else:
            self.grad.index_copy_(0, rows, grad.to(self.dtype))

    def grads(self) -> tuple[torch.Tensor]:
        return (_pad_to(self.grad.to(self.dtype), -1, self.full_columns),)


class LinearLogits:
    """Logits `hidden @ weight.T` from hidden states `[N, H]` and an LM-head shard `[V/tp, H]`.

    `chunk_rows` bounds the rows of every logits block it computes, lookups included.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, chunk_rows: Optional[int] = None):
        if hidden.shape[-1] != weight.shape[-1]:
            raise ValueError(f"hidden {tuple(hidden.shape)} and LM-head weight {tuple(weight.shape)} "
                             "must share the hidden size")
        self.hidden, self.weight = hidden, weight
        self.tensors = (hidden, weight)
        self.num_rows, self.local_vocab = hidden.shape[0], weight.shape[0]
        # At least MIN_LINEAR_CHUNK_ROWS rows: each chunk reads the whole head shard, so
        # thin chunks make the matmul bound by memory bandwidth.
        self.chunk_rows = chunk_rows or max(MIN_LINEAR_CHUNK_ROWS, DEFAULT_CHUNK_ELEMENTS // max(1, self.local_vocab))
        self.dtype = torch.promote_types(hidden.dtype, weight.dtype)
        self.device = hidden.device
        self.grad_hidden = self.grad_weight = None
        self.full_columns = self.local_vocab  # what `grads()` pads the weight's gradient back to

    def narrowed(self, columns: int) -> "LinearLogits":
        narrow = LinearLogits(self.hidden, self.weight[:columns], self.chunk_rows)
        narrow.full_columns = self.full_columns
        return narrow

    def rebuild(self):
        """A constructor that turns `self.tensors` back into an equivalent source."""
        return functools.partial(LinearLogits, chunk_rows=self.chunk_rows)

    def chunk(self, rows: Rows) -> torch.Tensor:
        return self.hidden[rows] @ self.weight.T

    def read_chunk(self, rows: Rows, out: torch.Tensor) -> torch.Tensor:
        """`chunk(rows)` written into `out` `[rows, V/tp]`."""
        if out.dtype == self.dtype:
            return torch.matmul(self.hidden[rows], self.weight.T, out=out)
        return out.copy_(self.chunk(rows))

    def at(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """Through chunked logits blocks: gathering K head rows per token would cost `[n, K, H]`."""
        row_index = rows.reshape(-1)
        parts = [self.chunk(row_index[start:start + self.chunk_rows]).gather(-1, local_ids[start:start + self.chunk_rows])
                 for start in range(0, row_index.numel(), self.chunk_rows)]
        return torch.cat(parts) if parts else local_ids.new_empty(local_ids.shape, dtype=self.dtype)

    def start_backward(self, dtype: torch.dtype) -> None:
        self.grad_hidden = torch.zeros(self.hidden.shape, dtype=dtype, device=self.device)
        self.grad_weight = torch.zeros(self.weight.shape, dtype=dtype, device=self.device)

    def add_chunk_grad(self, rows: Rows, grad: torch.Tensor) -> None:
        """`grad` `[rows, V/tp]`: the gradient of this chunk's logits."""
        self.grad_hidden[rows] += grad @ self.weight.to(grad.dtype)
        self.grad_weight += grad.T @ self.hidden[rows].to(grad.dtype)

    def start_grad_writes(self, compute_dtype: torch.dtype, every_row: bool) -> None:
        self.start_backward(compute_dtype)

    write_chunk_grad = add_chunk_grad

    def scale_grads(self, factor) -> None:
        """Multiplies the accumulated gradients (computed for a unit upstream gradient) by `factor`."""
        self.grad_hidden.mul_(factor)
        self.grad_weight.mul_(factor)

    def grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.grad_hidden.to(self.hidden.dtype), _pad_to(self.grad_weight.to(self.weight.dtype), 0,
                                                               self.full_columns)


def _pad_to(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`tensor` with zeros appended along `dim` up to `size` (the columns a narrowed source left out)."""
    missing = size - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
