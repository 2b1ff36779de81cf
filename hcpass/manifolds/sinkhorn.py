"""mHC (Xie et al., arXiv 2512.24880): H_res = Sinkhorn-Knopp(exp(logits))."""

from __future__ import annotations

import torch
from torch import Tensor

from hcpass.manifolds import register_manifold
from hcpass.manifolds.base import Manifold, compute_dtype

# Off-diagonal logit of the near-identity init: exp(-8) ~ 3e-4 (the mHC implementations' choice).
OFF_DIAGONAL_LOGIT = -8.0


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Alternate column then row normalisation of exp(logits), `iters` times, in fp32 (or fp64).

    Ending on the row step makes every row sum to 1 up to rounding, so n identical streams
    stay identical (the function-preservation argument in docs/math.md); columns converge
    to 1 as iterations grow. The max is subtracted first so |logit| up to 1e4 stays finite.
    """
    logits = logits.to(compute_dtype(logits.dtype))
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(-2, keepdim=True).clamp_min(1e-30)
        m = m / m.sum(-1, keepdim=True).clamp_min(1e-30)
    return m


@register_manifold
class Sinkhorn(Manifold):
    name = "sinkhorn"
    aliases = ("mhc",)
    description = "mHC: doubly stochastic H_res by Sinkhorn-Knopp (approximate, t_max iterations)"
    option_defaults = {"sinkhorn_iters": 20}

    def validate(self) -> None:
        iters = self.options["sinkhorn_iters"]
        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
            raise ValueError(f"sinkhorn_iters must be an integer >= 1, got {iters!r}")

    @property
    def res_logits(self) -> int:
        return self.streams * self.streams

    def res_map(self, logits: Tensor) -> Tensor:
        n = self.streams
        return sinkhorn(logits.unflatten(-1, (n, n)), self.options["sinkhorn_iters"])

    def res_identity_bias(self) -> Tensor:
        n = self.streams
        eye = torch.eye(n)
        return (eye * 0.0 + (1 - eye) * OFF_DIAGONAL_LOGIT).flatten()
