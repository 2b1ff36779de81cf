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
from hcpass.manifolds.base import Manifold, compute_dtype

# n! logits per position (and n! * n * n FLOPs): 8! = 40320 is already far past practical.
MAX_STREAMS = 8

# Logit of every non-identity permutation at init: weight exp(-8) ~ 3e-4 each (mHC-lite).
OTHER_PERMUTATION_LOGIT = -8.0


@functools.cache
def permutation_matrices(n: int) -> Tensor:
    """``[n!, n * n]`` fp64: row k is P_k flattened, ``P_k[i, perm_k[i]] = 1``. The
    identity comes first (itertools yields permutations in lexicographic order)."""
    eye = torch.eye(n, dtype=torch.float64)
    return torch.stack([eye[list(p)] for p in itertools.permutations(range(n))]).flatten(1)


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
        basis = permutation_matrices(n).to(dtype=weights.dtype, device=weights.device)
        return (weights @ basis).unflatten(-1, (n, n))

    def res_identity_bias(self) -> Tensor:
        bias = torch.full((self.res_logits,), OTHER_PERMUTATION_LOGIT)
        bias[0] = 0.0
        return bias
