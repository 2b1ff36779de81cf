"""The stream ops' eager CPU kernels: per-position n x n mixes as batched matmuls.

Same signatures and results as `hcpass.ops.reference` (tests/test_ops.py compares them over
shapes and dtypes). The reference writes each mix as a broadcast product and a sum, the form
Inductor fuses into one loop without materialising the product -- which is why the CPU
lowering inlines the reference. Run eagerly, that product is materialised: ``post_res``
builds an ``[n, n, *pos, C]`` temporary (n^2 times the stream state), and its backward two
more. Here every position's mix is one small matmul over the stream-major state viewed
positions-first (``P = prod(pos)``):

    post_res:  X'[p]        = H_res[p] @ X[p] + H_post[p]^T y[p]       X[p]: [n, C]
    backward:  dX[p]        = H_res[p]^T @ G[p]
               dy[p]        = H_post[p] @ G[p]                          (1 x n @ n x C)
               dH_post[p]   = G[p] @ y[p]^T                             (n x C @ C x 1)
               dH_res[p]    = G[p] @ X[p]^T
    pre:       u[p]         = H_pre[p] @ X[p]                           (1 x n @ n x C)
    backward:  dX[p]        = H_pre[p]^T g[p],  dH_pre[p] = X[p] @ g[p]^T

Coefficients are fp32 (fp64 for fp64 streams); stream arithmetic accumulates in that dtype
and returns the stream dtype; every output is contiguous.
"""

from __future__ import annotations

import math

from torch import Tensor

from hcpass.manifolds.base import compute_dtype


def _positions(x: Tensor) -> int:
    """P, the number of positions of a stream state ``[n, *pos, C]`` (0 for an empty batch,
    where ``reshape(-1, ...)`` could not tell)."""
    return math.prod(x.shape[1:-1])


def _positions_first(x: Tensor, dtype) -> Tensor:
    """``[n, *pos, C]`` -> ``[P, n, C]`` (a view where the layout allows)."""
    return x.to(dtype).reshape(x.shape[0], _positions(x), x.shape[-1]).transpose(0, 1)


def _stream_major(t: Tensor, shape) -> Tensor:
    """``[P, n, C]`` -> ``[n, *pos, C]``, contiguous."""
    return t.transpose(0, 1).contiguous().view(shape)


def pre(x: Tensor, h_pre: Tensor) -> Tensor:
    acc = compute_dtype(x.dtype)
    n, P = x.shape[0], _positions(x)
    u = h_pre.to(acc).reshape(P, 1, n) @ _positions_first(x, acc)
    return u.reshape(x.shape[1:]).to(x.dtype)


def pre_backward(grad_u: Tensor, x: Tensor, h_pre: Tensor) -> tuple[Tensor, Tensor]:
    acc = compute_dtype(x.dtype)
    n, P, C = x.shape[0], _positions(x), x.shape[-1]
    g = grad_u.to(acc).reshape(P, 1, C)
    grad_x = h_pre.to(acc).reshape(P, n, 1) * g  # [P, n, C]
    grad_h_pre = _positions_first(x, acc) @ g.transpose(1, 2)  # [P, n, 1]
    return (
        _stream_major(grad_x, x.shape).to(x.dtype),
        grad_h_pre.reshape(h_pre.shape).to(h_pre.dtype),
    )


def post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    acc = compute_dtype(x.dtype)
    n, P, C = x.shape[0], _positions(x), x.shape[-1]
    mixed = h_res.to(acc).reshape(P, n, n) @ _positions_first(x, acc)
    out = mixed + h_post.to(acc).reshape(P, n, 1) * y.to(acc).reshape(P, 1, C)
    return _stream_major(out, x.shape).to(x.dtype)


def post_res_backward(
    grad_out: Tensor, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = compute_dtype(x.dtype)
    n, P, C = x.shape[0], _positions(x), x.shape[-1]
    g = _positions_first(grad_out, acc)  # [P, n, C]
    ys = y.to(acc).reshape(P, C, 1)
    grad_x = h_res.to(acc).reshape(P, n, n).transpose(1, 2) @ g
    grad_y = h_post.to(acc).reshape(P, 1, n) @ g
    grad_h_post = g @ ys
    grad_h_res = g @ _positions_first(x, acc).transpose(1, 2)
    return (
        _stream_major(grad_x, x.shape).to(x.dtype),
        grad_y.reshape(y.shape).to(y.dtype),
        grad_h_post.reshape(h_post.shape).to(h_post.dtype),
        grad_h_res.reshape(h_res.shape).to(h_res.dtype),
    )
