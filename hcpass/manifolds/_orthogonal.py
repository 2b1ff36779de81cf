"""Skew-symmetric matrices and the Cayley transform, shared by the orthogonal manifolds
(spectral, stiefel, grassmann). Not a manifold: nothing here is registered."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

Pairs = tuple[tuple[int, int], ...]


def upper_pairs(n: int, limit: int | None = None) -> Pairs:
    """Row-major (i, j), i < j < limit (default n): the free entries of a skew matrix."""
    limit = n if limit is None else limit
    return tuple((i, j) for i in range(limit) for j in range(i + 1, limit))


@functools.cache
def _skew_basis(n: int, pairs: Pairs) -> Tensor:
    basis = torch.zeros(len(pairs), n, n, dtype=torch.float64)
    for k, (i, j) in enumerate(pairs):
        basis[k, i, j] = 1.0
        basis[k, j, i] = -1.0
    return basis.flatten(1)


def skew(entries: Tensor, n: int, pairs: Pairs) -> Tensor:
    """``[..., len(pairs)]`` -> ``[..., n, n]`` skew matrix with ``W[i, j] = -W[j, i] = entry``.

    A matmul with a constant basis rather than an indexed write: no in-place op, so it
    traces, vmaps and differentiates like any other matmul.
    """
    basis = _skew_basis(n, pairs).to(dtype=entries.dtype, device=entries.device)
    return (entries @ basis).unflatten(-1, (n, n))


def cayley(w: Tensor) -> Tensor:
    """``(I - W)(I + W)^{-1}`` of a skew ``W``: exactly orthogonal with determinant +1, and I
    at W = 0. Never singular: the eigenvalues of I + W are 1 + i*lambda. The two factors
    commute, so this is also ``(I + W)^{-1}(I - W)``, which is what the solve computes.

    In floating point the orthogonality error grows like ``|W| * eps`` (``cond(I + W)``).
    """
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    return torch.linalg.solve(eye + w, eye - w)
