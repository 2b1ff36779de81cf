"""Plain-PyTorch reference of the three mixer ops and their backward.

This is the contract every back end implements (the Triton kernels in `hcpass.codegen`
have exactly these signatures) and the CPU path: the hcpass backend substitutes these
functions for the custom ops so Inductor fuses them into C++.

Shapes (stream-major, see docs/math.md): ``x[n, *pos, C]``, ``y[*pos, C]``,
``h_pre[*pos, n]``, ``h_post[*pos, n]``, ``h_res[*pos, n, n]``. Coefficients are fp32 (fp64 for fp64
streams); stream arithmetic accumulates in fp32 and returns the stream dtype. Every output is
contiguous, as the ops' fake kernels promise Inductor.
"""

from __future__ import annotations

from torch import Tensor

from hcpass.manifolds import resolve
from hcpass.manifolds.base import compute_dtype


def coeffs(
    x: Tensor, phi: Tensor | None, alpha: Tensor | None, bias: Tensor, manifold: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-position (H_pre, H_post, H_res) of the stream state `x` under `manifold`."""
    h_pre, h_post, h_res = resolve(manifold).coefficients(x, phi, alpha, bias)
    return h_pre.contiguous(), h_post.contiguous(), h_res.contiguous()


def pre(x: Tensor, h_pre: Tensor) -> Tensor:
    """Branch input ``u = sum_i H_pre[..., i] * x[i]``."""
    acc = compute_dtype(x.dtype)
    weights = h_pre.to(acc).movedim(-1, 0).unsqueeze(-1)
    return (weights * x.to(acc)).sum(0).to(x.dtype).contiguous()


def post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """New stream state ``X'[i] = sum_j H_res[..., i, j] X[j] + H_post[..., i] * y``.

    Written positions first (``[*pos, i, j, C]`` products, summed over j), so that the
    gradient AOTAutograd derives for H_res, ``sum_C dX'[i] X[j]``, is a reduction laid out
    ``[*pos, i, j]``: Inductor's kernel then reads each position's n rows of both states
    once, where stream-major (``[i, j, *pos]``) it streamed both whole states n^2 times."""
    acc = compute_dtype(x.dtype)
    streams = x.to(acc).movedim(0, -2)  # [*pos, n, C]
    mixed = (h_res.to(acc).unsqueeze(-1) * streams.unsqueeze(-3)).sum(-2)
    out = mixed + h_post.to(acc).unsqueeze(-1) * y.to(acc).unsqueeze(-2)
    return out.movedim(-2, 0).to(x.dtype).contiguous()


def post_res_coeffs_pre(
    x: Tensor,
    y: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    phi: Tensor | None,
    alpha: Tensor | None,
    bias: Tensor,
    manifold: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Where site l ends and site l+1 begins: site l's merge ``X' = post_res(x, y, ...)``,
    then site l+1's coefficients of X' and its branch input. Returns
    ``(X', H_pre', H_post', H_res', u')``; the CUDA kernel reads X' back once instead of twice."""
    out = post_res(x, y, h_post, h_res)
    h_pre_next, h_post_next, h_res_next = coeffs(out, phi, alpha, bias, manifold)
    return out, h_pre_next, h_post_next, h_res_next, pre(out, h_pre_next)


def pre_backward(grad_u: Tensor, x: Tensor, h_pre: Tensor) -> tuple[Tensor, Tensor]:
    acc = compute_dtype(x.dtype)
    g = grad_u.to(acc)
    grad_x = (h_pre.to(acc).movedim(-1, 0).unsqueeze(-1) * g.unsqueeze(0)).to(x.dtype)
    grad_h_pre = (x.to(acc) * g.unsqueeze(0)).sum(-1).movedim(0, -1).to(h_pre.dtype)
    return grad_x.contiguous(), grad_h_pre.contiguous()


def post_res_backward(
    grad_out: Tensor, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = compute_dtype(x.dtype)
    g = grad_out.to(acc)
    h_res_ij = h_res.to(acc).movedim((-2, -1), (0, 1)).unsqueeze(-1)
    # grad_x[j] = sum_i H_res[i, j] g[i]
    grad_x = (h_res_ij * g.unsqueeze(1)).sum(0)
    grad_y = (h_post.to(acc).movedim(-1, 0).unsqueeze(-1) * g).sum(0)
    grad_h_post = (g * y.to(acc).unsqueeze(0)).sum(-1).movedim(0, -1)
    grad_h_res = (g.unsqueeze(1) * x.to(acc).unsqueeze(0)).sum(-1).movedim((0, 1), (-2, -1))
    return (
        grad_x.to(x.dtype).contiguous(),
        grad_y.to(y.dtype).contiguous(),
        grad_h_post.to(h_post.dtype).contiguous(),
        grad_h_res.to(h_res.dtype).contiguous(),
    )


def coeffs_backward(
    grad_pre: Tensor,
    grad_post: Tensor,
    grad_res: Tensor,
    x: Tensor,
    phi: Tensor | None,
    alpha: Tensor | None,
    bias: Tensor,
    manifold: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x, phi, alpha, bias), recomputing the forward from the inputs (nothing
    else is saved): the closed form of `Manifold.coefficients_backward`, whose docstring
    derives it. A missing phi/alpha gets an empty gradient."""
    grads = resolve(manifold).coefficients_backward(
        grad_pre, grad_post, grad_res, x, phi, alpha, bias
    )
    return tuple(g.contiguous() if g is not None else x.new_empty(0) for g in grads)
