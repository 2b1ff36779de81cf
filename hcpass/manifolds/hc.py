"""HC -- Hyper-Connections (Zhu et al., arXiv 2409.19606): unconstrained coefficients.

The paper's connection matrix is ``[[0, B], [A_m, A_r]]`` and its update is
``X' = A_r^T X + B^T y``, ``u = A_m^T X``. In our convention (``X'[i] = sum_j H_res[i, j] X[j]``)
that is ``H_pre = A_m``, ``H_post = B`` and ``H_res = A_r^T``. The paper's dynamic A_r has one
row per stream, row i computed from stream i alone, so column i of our H_res is the part
produced from stream i: how stream i is spread over the new streams.

Dynamic part, per stream i with ``Xn[i] = rmsnorm(X[i])`` (parameter-free)::

    A_m[i] = s_alpha * tanh(Xn[i] @ W_m)   + A_m_static[i]
    B[i]   = s_beta  * tanh(Xn[i] @ W_beta) + B_static[i]
    A_r[i] = s_alpha * tanh(Xn[i] @ W_r)   + A_r_static[i]      (a row of n)

W's are shared by the streams: ``phi = [W_m | W_beta | W_r]`` of shape ``[C, 2 + n]``. The
three alpha slots are (s_alpha for A_m, s_beta, s_alpha for A_r): the paper ties the first and
the last; we let them train apart (both start at `alpha`, 0.01). There is no sigmoid anywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcpass.manifolds import register_manifold
from hcpass.manifolds.base import RMS_EPS, Manifold, compute_dtype


@register_manifold
class HyperConnections(Manifold):
    name = "hc"
    description = "HC: unconstrained H_pre/H_post/H_res from per-stream tanh features (Zhu et al.)"

    @property
    def res_logits(self) -> int:
        return self.streams * self.streams

    def res_map(self, logits: Tensor) -> Tensor:
        # The logits are A_r row-major; our H_res is its transpose (see the module docstring).
        n = self.streams
        return logits.to(compute_dtype(logits.dtype)).unflatten(-1, (n, n)).transpose(-2, -1)

    def res_identity_bias(self) -> Tensor:
        return torch.eye(self.streams).flatten()

    def phi_shape(self, channels: int) -> tuple[int, ...]:
        return (channels, 2 + self.streams)

    def project(self, x: Tensor, phi: Tensor) -> Tensor:
        """Per-stream ``tanh(rmsnorm(X[i]) @ phi)``, laid out like the bias:
        ``[*positions, n (A_m) + n (B) + n*n (A_r row-major)]``."""
        dtype = compute_dtype(x.dtype)
        xs = x.to(dtype)
        normed = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        feats = torch.tanh(normed @ phi.to(dtype)).movedim(0, -2)  # [*pos, n (stream), 2 + n]
        return torch.cat([feats[..., 0], feats[..., 1], feats[..., 2:].flatten(-2)], dim=-1)

    def coefficients(
        self, x: Tensor, phi: Tensor | None, alpha: Tensor | None, bias: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        positions = x.shape[1:-1]
        dtype = compute_dtype(x.dtype)
        h_pre, h_post, l_res = self.split(bias.to(dtype))
        if phi is not None:
            d_pre, d_post, d_res = self.split(self.project(x, phi))
            a = alpha.to(dtype)
            h_pre = a[0] * d_pre + h_pre
            h_post = a[1] * d_post + h_post
            l_res = a[2] * d_res + l_res
        n = self.streams
        return (
            h_pre.expand(*positions, n),
            h_post.expand(*positions, n),
            self.res_map(l_res).expand(*positions, n, n),
        )

    def init_bias(self, chain_position: int, *, keep_copies: bool = False) -> Tensor:
        """The paper's init for every `init` value, because it already preserves the
        function: A_m one-hot on stream ``chain_position mod n`` (sum 1), B = 1, A_r = I. The
        one-hot also breaks the symmetry between the n identical copies, and its H_res,
        unconstrained, gets gradients from the first step (`keep_copies` changes nothing)."""
        n = self.streams
        a_m = torch.zeros(n)
        a_m[chain_position % n] = 1.0
        return torch.cat([a_m, torch.ones(n), self.res_identity_bias()])
