"""Skew-symmetric matrices and the Cayley transform, shared by the orthogonal manifolds
(spectral, stiefel, grassmann). Not a manifold: nothing here is registered."""

from __future__ import annotations

import torch
from torch import Tensor

from hcpass.manifolds._constants import constant

# The free entries of a skew matrix: (i, j) with i < j, i in rows, j in cols, row-major.
Block = tuple[range, range]


def upper(limit: int) -> Block:
    """The strict upper triangle of the leading limit x limit block."""
    return range(limit), range(limit)


def block_pairs(block: Block) -> tuple[tuple[int, int], ...]:
    """The (i, j) of `block`, in the order of `skew`'s entries."""
    rows, cols = block
    return tuple((i, j) for i in rows for j in cols if i < j)


def _skew_basis(n: int, block: Block, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[len(block_pairs), n * n]``: row k is the flattened skew matrix with +1 at the k-th
    free entry (i, j) and -1 at (j, i); built from arange (see hcpass.manifolds._constants)."""
    (rows, cols), count = block, len(block_pairs(block))
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    in_rows = (i >= rows.start) & (i < rows.stop)
    in_cols = (j >= cols.start) & (j < cols.stop)
    free = ((i < j) & in_rows & in_cols).flatten()
    order = free.cumsum(0) - 1  # row-major rank of each free entry
    slot = torch.arange(count, device=device)[:, None]
    upper = (free & (order == slot)).to(dtype).unflatten(-1, (n, n))
    return (upper - upper.transpose(-2, -1)).flatten(1)


def skew(entries: Tensor, n: int, block: Block) -> Tensor:
    """``[..., len(block_pairs(block))]`` -> ``[..., n, n]`` skew matrix with
    ``W[i, j] = -W[j, i] = entry`` on the block's free entries, 0 elsewhere.

    A matmul with a constant basis rather than an indexed write: no in-place op, so it
    traces, vmaps and differentiates like any other matmul.
    """
    basis = constant(_skew_basis, n, block, like=entries)
    return (entries @ basis).unflatten(-1, (n, n))


def cayley(w: Tensor) -> Tensor:
    """``(I - W)(I + W)^{-1}`` of a skew ``W``: exactly orthogonal with determinant +1, and I
    at W = 0. Never singular: the eigenvalues of I + W are 1 + i*lambda. The two factors
    commute, so this is also ``(I + W)^{-1}(I - W)``, which is what the solve computes.

    In floating point the orthogonality error grows like ``|W| * eps`` (``cond(I + W)``).
    """
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    return torch.linalg.solve(eye + w, eye - w)
