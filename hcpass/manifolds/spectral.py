"""sHC (arXiv 2603.20896): H_res on the spectral sphere, negative entries allowed.

``H_res = J + U_z U diag(s) V^T U_z^T`` with ``J = 11^T / n`` and U_z a Helmert basis of the
complement of 1. J keeps the all-ones direction (``H 1 = 1``, ``1^T H = 1^T``); on its complement
H acts as ``U diag(s) V^T`` with U, V in SO(n - 1) (Cayley) and ``|s| < 1`` (tanh), so the largest
singular value is exactly 1.

The paper's ``z_U <- gamma * tanh(c * z_U + b_U)`` (likewise V) and ``s = tanh(c * z_S + b_S)``
map onto our slots as: c = alpha[2] (one scale shared by U, V, S), b = the bias logits,
``z = x' phi_res`` the dynamic projection; gamma is the fixed option `gamma` (our parameters
are phi, alpha and bias only). Logit layout, m = n - 1: z_U (m(m-1)/2), z_V (m(m-1)/2), z_S (m).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hcpass.manifolds import register_manifold
from hcpass.manifolds._constants import constant
from hcpass.manifolds._orthogonal import cayley, skew, upper
from hcpass.manifolds.base import MIXED_DIAGONAL, Manifold, compute_dtype

# b_S at init: s = tanh(4) ~ 0.99933, so H_res ~ I (exact row sums 1 keep it function preserving).
SINGULAR_VALUE_BIAS = 4.0


def helmert_basis(n: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[n, n - 1]`` orthonormal basis of the complement of 1: column k - 1 is
    ``(1, ..., 1, -k, 0, ..., 0) / sqrt(k (k + 1))`` with k ones. Computed in fp64 and
    rounded once to `dtype`; built from arange (see hcpass.manifolds._constants)."""
    row = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    k = torch.arange(1, n, device=device, dtype=torch.float64)[None, :]
    entry = torch.where(row < k, 1.0, torch.where(row == k, -k, 0.0))
    return (entry / torch.sqrt(k * (k + 1))).to(dtype)


@register_manifold
class Spectral(Manifold):
    name = "spectral"
    aliases = ("shc",)
    description = "sHC: H_res = J + U diag(s) V^T on the complement of 1; spectral norm exactly 1"
    option_defaults = {"gamma": 1.0}

    def validate(self) -> None:
        gamma = self.options["gamma"]
        is_number = isinstance(gamma, (int, float)) and not isinstance(gamma, bool)
        if not (is_number and 0 < gamma < math.inf):
            raise ValueError(
                f"spectral gamma must be a finite number > 0 (it bounds the skew entries of the "
                f"rotations), got {gamma!r}"
            )

    @property
    def res_logits(self) -> int:
        return (self.streams - 1) ** 2

    def res_map(self, logits: Tensor) -> Tensor:
        n, m = self.streams, self.streams - 1
        logits = logits.to(compute_dtype(logits.dtype))
        k = m * (m - 1) // 2
        z_u, z_v, z_s = logits.split([k, k, m], dim=-1)
        gamma = self.options["gamma"]
        u = cayley(skew(gamma * torch.tanh(z_u), m, upper(m)))
        v = cayley(skew(gamma * torch.tanh(z_v), m, upper(m)))
        core = (u * torch.tanh(z_s).unsqueeze(-2)) @ v.transpose(-2, -1)  # U diag(s) V^T
        basis = constant(helmert_basis, n, like=logits)
        return 1.0 / n + basis @ core @ basis.T

    def res_identity_bias(self) -> Tensor:
        return self._bias(SINGULAR_VALUE_BIAS)

    def res_init_bias(self) -> Tensor:
        # U = V = I and equal s: H_res = J + s (I - J), diagonal 1/n + s (n - 1)/n, solved for
        # MIXED_DIAGONAL. tanh(4) also sits where tanh's slope is 1e-3; atanh(s) does not.
        n = self.streams
        if n == 1:
            return self.res_identity_bias()
        return self._bias(math.atanh((n * MIXED_DIAGONAL - 1) / (n - 1)))

    def _bias(self, singular_value_logit: float) -> Tensor:
        m = self.streams - 1
        return torch.cat([torch.zeros(m * (m - 1)), torch.full((m,), singular_value_logit)])
