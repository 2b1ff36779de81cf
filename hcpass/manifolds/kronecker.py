"""KromHC (arXiv 2601.21579): H_res = U_1 kron U_2 kron ... kron U_K for n = 2^K streams.

Each factor is the 2 x 2 doubly stochastic ``[[p, 1 - p], [1 - p, p]]`` with ``(p, 1 - p)`` the
softmax of its two logits. A Kronecker product of doubly stochastic matrices is doubly
stochastic, exactly. Factor k acts on bit k of the stream index, most significant first
(U_1 swaps the two halves of the streams, U_K swaps neighbours).

n = 1 is K = 0: the empty product, H_res = [[1]] with no logits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hcpass.manifolds import register_manifold
from hcpass.manifolds.base import MIXED_DIAGONAL, Manifold, compute_dtype

# Per-factor identity bias [0, -8]: p = sigmoid(8) ~ 0.99966 (KromHC's init).
SWAP_LOGIT = -8.0

# The fused epilogue (see Manifold.triton_res_map), on the flat res logits: column 2f and
# 2f + 1 are factor f's pair. H_res[i, j] = prod_f (p_f if i and j agree on factor f's bit else
# q_f); the gradient of factor f takes the product of the other factors, recomputed (no
# division: q_f can underflow to 0).
TRITON_KRONECKER = """
@triton.jit
def _kron_pair(logits, f: tl.constexpr):
    # (p, q) = softmax of factor f's two logits, as [BLOCK] vectors
    r = tl.arange(0, logits.shape[1])[None, :]
    a = tl.sum(tl.where(r == 2 * f, logits, 0.0), axis=1)
    b = tl.sum(tl.where(r == 2 * f + 1, logits, 0.0), axis=1)
    return tl.sigmoid(a - b), tl.sigmoid(b - a)


@triton.jit
def _kron_same(f: tl.constexpr, S: tl.constexpr):
    # [1, S, S]: streams i and j agree on factor f's bit (factor 0 on the most significant)
    bit: tl.constexpr = {factors} - 1 - f
    i = tl.arange(0, S)
    return (((i[:, None] >> bit) & 1) == ((i[None, :] >> bit) & 1))[None, :, :]


@triton.jit
def _kron_factor(logits, f: tl.constexpr, S: tl.constexpr):
    p, q = _kron_pair(logits, f)
    return tl.where(_kron_same(f, S), p[:, None, None], q[:, None, None])


@triton.jit
def res_map(logits, N: tl.constexpr, S: tl.constexpr):
    h = tl.full((logits.shape[0], S, S), 1.0, logits.dtype)
    for f in tl.static_range({factors}):
        h = h * _kron_factor(logits, f, S)
    return h


@triton.jit
def res_map_vjp(logits, grad, N: tl.constexpr, S: tl.constexpr):
    r = tl.arange(0, logits.shape[1])[None, :]
    d = tl.zeros(logits.shape, logits.dtype)
    for f in tl.static_range({factors}):
        others = tl.full((logits.shape[0], S, S), 1.0, logits.dtype)
        for g in tl.static_range({factors}):
            if g != f:
                others = others * _kron_factor(logits, g, S)
        same = _kron_same(f, S)
        g_p = tl.sum(tl.sum(tl.where(same, grad * others, 0.0), axis=2), axis=1)
        g_q = tl.sum(tl.sum(tl.where(same, 0.0, grad * others), axis=2), axis=1)
        p, q = _kron_pair(logits, f)
        # softmax's vjp on a pair: d(first logit) = p q (g_p - g_q) = -d(second logit)
        da = (p * q * (g_p - g_q))[:, None]
        d += tl.where(r == 2 * f, da, tl.where(r == 2 * f + 1, -da, 0.0))
    return d
"""


@register_manifold
class Kronecker(Manifold):
    name = "kronecker"
    aliases = ("kromhc",)
    description = "KromHC: exactly doubly stochastic H_res, Kronecker product of 2x2 factors"

    def validate(self) -> None:
        n = self.streams
        if n & (n - 1):
            raise ValueError(
                f"kronecker (kromhc) needs streams to be a power of 2 (1, 2, 4, 8, ...): "
                f"H_res is a Kronecker product of 2x2 factors; got streams={n}"
            )

    @property
    def factors(self) -> int:
        return self.streams.bit_length() - 1

    @property
    def res_logits(self) -> int:
        return 2 * self.factors

    def res_map(self, logits: Tensor) -> Tensor:
        logits = logits.to(compute_dtype(logits.dtype))
        batch = logits.shape[:-1]
        h = logits.new_ones(*batch, 1, 1)
        for pair in logits.unflatten(-1, (self.factors, 2)).unbind(-2):
            p, q = torch.softmax(pair, dim=-1).unbind(-1)
            u = torch.stack([p, q, q, p], dim=-1).unflatten(-1, (2, 2))
            # (H kron U)[(a, c), (b, d)] = H[a, b] * U[c, d]
            size = 2 * h.shape[-1]
            h = (h[..., :, None, :, None] * u[..., None, :, None, :]).reshape(*batch, size, size)
        return h

    def res_identity_bias(self) -> Tensor:
        return torch.tensor([0.0, SWAP_LOGIT]).repeat(self.factors)

    def res_init_bias(self) -> Tensor:
        # Every factor keeps p = MIXED_DIAGONAL ** (1 / K): the diagonal of the product is p^K.
        if self.factors == 0:
            return self.res_identity_bias()
        p = MIXED_DIAGONAL ** (1 / self.factors)
        return torch.tensor([0.0, math.log((1 - p) / p)]).repeat(self.factors)

    triton_res_layout = "flat"

    def triton_res_map(self) -> str:
        return TRITON_KRONECKER.format(factors=self.factors)
