"""KromHC (arXiv 2601.21579): H_res = U_1 kron U_2 kron ... kron U_K for n = 2^K streams.

Each factor is the 2 x 2 doubly stochastic ``[[p, 1 - p], [1 - p, p]]`` with ``(p, 1 - p)`` the
softmax of its two logits. A Kronecker product of doubly stochastic matrices is doubly
stochastic, exactly. Factor k acts on bit k of the stream index, most significant first
(U_1 swaps the two halves of the streams, U_K swaps neighbours).

n = 1 is K = 0: the empty product, H_res = [[1]] with no logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcpass.manifolds import register_manifold
from hcpass.manifolds.base import Manifold, compute_dtype

# Per-factor identity bias [0, -8]: p = sigmoid(8) ~ 0.99966 (KromHC's init).
SWAP_LOGIT = -8.0


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
