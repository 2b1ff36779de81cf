"""JPmHC, orthogonal variant (arXiv 2602.18308): H_res = Cayley(W) in SO(n).

``H_res = (I - W)(I + W)^{-1}`` with W skew-symmetric, computed exactly with a linear solve
(the paper reportedly iterates a Cayley retraction, which is only approximately orthogonal).
The paper builds ``W = H~ - H~^T`` from n^2 logits; only ``H~[i, j] - H~[j, i]`` matters, so we
take the n(n - 1)/2 strictly-upper entries of W as the logits directly (same family of maps,
no logits whose gradient is always zero).

Orthogonal H_res preserves norms, so the composite gain over depth is exactly 1. Its rows
do not sum to 1 in general, so n identical streams stop being identical as soon as
H_res != I: the identity init (all logits 0) gives W = 0 and H_res = I exactly, which is
what makes the converted model compute the original function at init.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcpass.manifolds import register_manifold
from hcpass.manifolds._orthogonal import cayley, skew, upper
from hcpass.manifolds.base import Manifold, compute_dtype


@register_manifold
class Stiefel(Manifold):
    name = "stiefel"
    aliases = ("jpmhc",)
    description = "JPmHC: orthogonal H_res = exact Cayley transform of a skew matrix, in SO(n)"

    @property
    def res_logits(self) -> int:
        return self.streams * (self.streams - 1) // 2

    def res_map(self, logits: Tensor) -> Tensor:
        n = self.streams
        return cayley(skew(logits.to(compute_dtype(logits.dtype)), n, upper(n)))

    def res_identity_bias(self) -> Tensor:
        return torch.zeros(self.res_logits)
