"""JPmHC, Grassmann rank-p variant (arXiv 2602.18308): rotate only inside a learned
p-dimensional subspace of the n streams.

The paper's exact definition was not retrievable; we use
``H_res = I + U (R - I) U^T`` with U in St(n, p) and R in SO(p), computed as
``H_res = Q blockdiag(R, I_{n-p}) Q^T`` where U is the first p columns of the orthogonal Q:

- ``Q = Cayley(S)``, S skew with only the p x (n - p) cross block free: the standard Cayley
  chart of the Grassmannian around span(e_1, ..., e_p), p (n - p) logits (its dimension).
  Rotations within the subspace would duplicate R and rotations of its complement do not
  move it, so neither gets logits.
- ``R = Cayley(W_R)``, W_R skew p x p: p (p - 1)/2 logits.

H_res is orthogonal (det +1), equals I on the orthogonal complement of span(U), and at the
identity init (all logits 0) is exactly I. Logit layout: the cross block (pairs (j, i) with
j < p <= i, row-major), then W_R's strict upper triangle. rank = n gives the stiefel map
with the same logits; rank = 1 is always the identity (SO(1) = {1}); the default rank
is min(2, n), a rotation in one learned plane. At R = I the subspace gets no gradient (it
does not change H_res), so R moves first and the subspace follows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcpass.manifolds import register_manifold
from hcpass.manifolds._orthogonal import cayley, skew, upper
from hcpass.manifolds.base import Manifold, compute_dtype


@register_manifold
class Grassmann(Manifold):
    name = "grassmann"
    description = "JPmHC Grassmann: orthogonal H_res rotating only a learned rank-p subspace"
    option_defaults = {"rank": None}

    def validate(self) -> None:
        n, rank = self.streams, self.options["rank"]
        if rank is None:
            rank = self.options["rank"] = min(2, n)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n:
            raise ValueError(
                f"grassmann rank must be an integer with 1 <= rank <= streams ({n}), got {rank!r}"
            )

    @property
    def rank(self) -> int:
        return self.options["rank"]

    @property
    def res_logits(self) -> int:
        n, p = self.streams, self.rank
        return p * (n - p) + p * (p - 1) // 2

    def res_map(self, logits: Tensor) -> Tensor:
        n, p = self.streams, self.rank
        logits = logits.to(compute_dtype(logits.dtype))
        cross, rot = logits.split([p * (n - p), p * (p - 1) // 2], dim=-1)
        q = cayley(skew(cross, n, (range(p), range(p, n))))
        # Cayley of a skew matrix supported on the leading p x p block is blockdiag(R, I).
        rotation = cayley(skew(rot, n, upper(p)))
        return q @ rotation @ q.transpose(-2, -1)

    def res_identity_bias(self) -> Tensor:
        return torch.zeros(self.res_logits)
