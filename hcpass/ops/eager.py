"""The CPU kernels of the stream ops in eager mode: the references' math as batched
matmuls over positions (``[*pos, n, C]`` views of the stream-major state), a few large ops
instead of n-wide broadcasts that materialise ``[n, n, *pos, C]`` products.

Same signatures and results as `hcpass.ops.reference` (tests/test_ops.py compares them per
dtype). The references stay what the CPU compile path lowers to: Inductor fuses their
pointwise form into its C++ kernels, where an opaque matmul would split the fusion.

Derivations (``X[n, *pos, C]``, per position p, ``Xp = X[:, p, :]`` an ``n x C`` matrix):
- pre: ``u_p = h_pre_p^T Xp``; backward ``dXp = h_pre_p g_p^T``, ``dh_pre_p = Xp g_p``.
- post_res: ``X'p = H_res_p Xp + h_post_p y_p^T``; backward ``dXp = H_res_p^T Gp``,
  ``dy_p = Gp^T h_post_p``, ``dh_post_p = Gp y_p``, ``dH_res_p = Gp Xp^T``.
Accumulation is in ``compute_dtype`` (fp32 for bf16 streams), as in the references.
"""

from __future__ import annotations

from torch import Tensor

from hcpass.manifolds.base import compute_dtype


def _positions_first(x: Tensor) -> Tensor:
    """``[n, *pos, C]`` -> ``[*pos, n, C]`` (a view)."""
    return x.movedim(0, -2)


def pre(x: Tensor, h_pre: Tensor) -> Tensor:
    acc = compute_dtype(x.dtype)
    u = h_pre.to(acc).unsqueeze(-2) @ _positions_first(x.to(acc))
    return u.squeeze(-2).to(x.dtype).contiguous()


def pre_backward(grad_u: Tensor, x: Tensor, h_pre: Tensor) -> tuple[Tensor, Tensor]:
    acc = compute_dtype(x.dtype)
    g = grad_u.to(acc)
    grad_x = h_pre.to(acc).movedim(-1, 0).unsqueeze(-1) * g
    grad_h_pre = (_positions_first(x.to(acc)) @ g.unsqueeze(-1)).squeeze(-1)
    return grad_x.to(x.dtype).contiguous(), grad_h_pre.to(h_pre.dtype).contiguous()


def post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    acc = compute_dtype(x.dtype)
    mixed = h_res.to(acc) @ _positions_first(x.to(acc))
    out = mixed.addcmul_(h_post.to(acc).unsqueeze(-1), y.to(acc).unsqueeze(-2))
    return out.movedim(-2, 0).to(x.dtype).contiguous()


def post_res_backward(
    grad_out: Tensor, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = compute_dtype(x.dtype)
    g = _positions_first(grad_out.to(acc))
    grad_x = h_res.to(acc).transpose(-2, -1) @ g
    grad_y = (h_post.to(acc).unsqueeze(-2) @ g).squeeze(-2)
    grad_h_post = (g @ y.to(acc).unsqueeze(-1)).squeeze(-1)
    grad_h_res = g @ _positions_first(x.to(acc)).transpose(-2, -1)
    return (
        grad_x.movedim(-2, 0).to(x.dtype).contiguous(),
        grad_y.to(y.dtype).contiguous(),
        grad_h_post.to(h_post.dtype).contiguous(),
        grad_h_res.to(h_res.dtype).contiguous(),
    )
