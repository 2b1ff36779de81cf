"""mHC-lite (arXiv 2601.05732): H_res = sum_k softmax(logits)_k P_k over all n! permutations.

By Birkhoff-von Neumann every doubly stochastic matrix is such a convex combination, and
every such combination is exactly doubly stochastic: no iterations, no approximation. The
price is n! logits (24 at n = 4, 40320 at n = 8).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import Tensor

from hcpass.manifolds import register_manifold
from hcpass.manifolds._constants import constant
from hcpass.manifolds.base import MIXED_DIAGONAL, Manifold, compute_dtype

# n! logits per position (and n! * n * n FLOPs): 8! = 40320 is already far past practical.
MAX_STREAMS = 8

# Logit of every non-identity permutation at init: weight exp(-8) ~ 3e-4 each (mHC-lite).
OTHER_PERMUTATION_LOGIT = -8.0


# The fused epilogue holds a [BLOCK, n!, n, n] tile: 384 entries per position at n = 4, 7680
# at n = 5. Wider mixers run res_map in PyTorch.
MAX_TRITON_STREAMS = 4

# The fused epilogue (see Manifold.triton_res_map), on the flat res logits (column k = P_k).
# perm_k(i) is read off integer literals: bits [BITS * k, BITS * (k + 1)) of row i's code.
TRITON_PERMUTATION = """
@triton.jit
def _perm_basis(RW: tl.constexpr, S: tl.constexpr, dtype: tl.constexpr):
    # [RW, S, S]: basis[k, i, j] = 1 where P_k[i, j] = 1 (rows k >= n! are 0)
    k = tl.arange(0, RW).to(tl.int64)
    i = tl.arange(0, S)[None, :, None]
    j = tl.arange(0, S)[None, None, :]
    valid = (k < {count})[:, None, None] & (i < {n}) & (j < {n})
    basis = tl.zeros((RW, S, S), dtype)
{rows}
    return tl.where(valid, basis, 0.0)


@triton.jit
def _perm_weights(logits):
    # softmax over the n! valid columns, exactly 0 on the padding
    r = tl.arange(0, logits.shape[1])[None, :]
    logits = tl.where(r < {count}, logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def res_map(logits, N: tl.constexpr, S: tl.constexpr):
    basis = _perm_basis(logits.shape[1], S, logits.dtype)
    return tl.sum(_perm_weights(logits)[:, :, None, None] * basis[None], axis=1)


@triton.jit
def res_map_vjp(logits, grad, N: tl.constexpr, S: tl.constexpr):
    basis = _perm_basis(logits.shape[1], S, logits.dtype)
    w = _perm_weights(logits)
    g_w = tl.sum(tl.sum(grad[:, None, :, :] * basis[None], axis=3), axis=2)
    return w * (g_w - tl.sum(w * g_w, axis=1)[:, None])
"""
TRITON_BASIS_ROW = """\
    target = (tl.full(k.shape, {code}, tl.int64) >> ({bits} * k)) & {mask}
    basis += tl.where((i == {row}) & (target[:, None, None] == j), 1.0, 0.0).to(dtype)"""


@functools.cache  # asked for on every kernel launch
def triton_source(n: int) -> str:
    """TRITON_PERMUTATION for n streams: one code per row i, perm_k(i) in its k-th field."""
    perms = list(itertools.permutations(range(n)))
    bits = max(1, (n - 1).bit_length())
    rows = []
    for row in range(n):
        code = sum(perm[row] << (bits * k) for k, perm in enumerate(perms))
        rows.append(TRITON_BASIS_ROW.format(code=code, bits=bits, mask=(1 << bits) - 1, row=row))
    return TRITON_PERMUTATION.format(count=len(perms), n=n, rows="\n".join(rows))


def permutation_matrices(n: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[n!, n * n]``: row k is P_k flattened, ``P_k[i, perm_k[i]] = 1``, in the order of
    ``itertools.permutations(range(n))`` (lexicographic: the identity first).

    Built from arange (see hcpass.manifolds._constants): perm_k is the k-th permutation in
    lexicographic order, decoded from k's factorial digits (Lehmer code): digit i, ``k //
    (n - 1 - i)! mod (n - i)``, picks perm_k[i] among the values not taken yet.
    """
    k = torch.arange(math.factorial(n), device=device)[:, None]
    free = torch.ones(k.shape[0], n, dtype=torch.bool, device=device)
    rows = []
    for i in range(n):
        digit = k // math.factorial(n - 1 - i) % (n - i)
        row = free & (free.cumsum(-1) == digit + 1)  # the digit-th value still free
        rows.append(row)
        free = free & ~row
    return torch.stack(rows, dim=1).to(dtype).flatten(1)


@register_manifold
class Permutation(Manifold):
    name = "permutation"
    aliases = ("mhc-lite",)
    description = "mHC-lite: exactly doubly stochastic H_res, softmax mix of all n! permutations"

    def validate(self) -> None:
        if self.streams > MAX_STREAMS:
            raise ValueError(
                f"permutation (mhc-lite) needs streams <= {MAX_STREAMS}: it has one logit per "
                f"permutation, n! = {math.factorial(self.streams)} at streams={self.streams}; "
                "use kronecker or sinkhorn for wider stream counts"
            )

    @property
    def res_logits(self) -> int:
        return math.factorial(self.streams)

    def res_map(self, logits: Tensor) -> Tensor:
        n = self.streams
        weights = torch.softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
        basis = constant(permutation_matrices, n, like=weights)
        return (weights @ basis).unflatten(-1, (n, n))

    def res_identity_bias(self) -> Tensor:
        bias = torch.full((self.res_logits,), OTHER_PERMUTATION_LOGIT)
        bias[0] = 0.0
        return bias

    def res_init_bias(self) -> Tensor:
        # Identity logit 0, every other permutation a: H_res[i, i] is the weight of the
        # (n - 1)! permutations fixing i, (1 + ((n - 1)! - 1) e^a) / (1 + (n! - 1) e^a);
        # solved for MIXED_DIAGONAL. By symmetry the off-diagonal entries are all equal.
        n = self.streams
        if n == 1:
            return self.res_identity_bias()
        fixing, total = math.factorial(n - 1), math.factorial(n)
        weight = (1 - MIXED_DIAGONAL) / (MIXED_DIAGONAL * (total - 1) - (fixing - 1))
        bias = torch.full((total,), math.log(weight))
        bias[0] = 0.0
        return bias

    triton_res_layout = "flat"

    def triton_res_map(self) -> str | None:
        return triton_source(self.streams) if self.streams <= MAX_TRITON_STREAMS else None
