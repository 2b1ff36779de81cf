"""The stream ops' eager CPU kernels in PyTorch, where `streams`' C++ kernel cannot be built:
the per-position n x n mixes as n (or n^2) products of contiguous ``[P, C]`` slabs.

Same signatures and results as `hcpass.ops.reference` (tests/ops/test_ops.py compares them over
shapes, dtypes and layouts). The reference writes each mix as a broadcast product and a sum,
the form Inductor fuses into one loop without materialising the product -- which is why the
CPU lowering inlines the reference. Run eagerly, that product is materialised: ``post_res``
builds an ``[n, n, *pos, C]`` temporary (n^2 times the stream state), and its backward two
more. Here the stream-major state is read as n slabs ``X[i]`` of ``[P, C]``
(``P = prod(pos)``) and every output stream is accumulated slab by slab, with the
coefficients as per-position ``[P, 1]`` columns:

    post_res:  X'[i]         = sum_j H_res[:, i, j] X[j] + H_post[:, i] y
    backward:  dX[j]         = sum_i H_res[:, i, j] G[i]
               dy            = sum_i H_post[:, i] G[i]
               dH_post[:, i] = <G[i], y>                      (<a, b> = sum over C)
               dH_res[:, i, j] = <G[i], X[j]>                 (one bmm over positions)
    pre:       u             = sum_i H_pre[:, i] X[i]
    backward:  dX[i]         = H_pre[:, i] g,   dH_pre[:, i] = <X[i], g>

Slabs rather than one matmul per position: positions-first (``[P, n, C]``), every output
would need a transposed copy back to stream-major, and a state whose streams are not laid
out as BLAS matrices -- a chain's first site reads its input expanded to n streams, stride
0 -- makes bmm copy it position by position (P clones per call).

Coefficients are fp32 (fp64 for fp64 streams); stream arithmetic accumulates in that dtype
and returns the stream dtype; every output is contiguous.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcpass.manifolds.base import compute_dtype, flatten_positions


def _mix(weights: Tensor, streams: Tensor, out: Tensor) -> Tensor:
    """``out = sum_j weights[:, j] * streams[j]`` for ``weights [P, m]``, ``streams [m, P, C]``
    and ``out [P, C]`` (written in place, returned)."""
    torch.mul(weights[:, :1], streams[0], out=out)
    for j in range(1, streams.shape[0]):
        out.addcmul_(weights[:, j : j + 1], streams[j])
    return out


def _dots(streams: Tensor, other: Tensor) -> Tensor:
    """``[P, m]``, contiguous: entry ``[p, i] = <streams[i, p], other[p]>`` for
    ``streams [m, P, C]``."""
    return (streams * other).sum(-1).transpose(0, 1).contiguous()


def pre(x: Tensor, h_pre: Tensor) -> Tensor:
    acc = compute_dtype(x.dtype)
    xs = flatten_positions(x).to(acc)
    n, P = xs.shape[:2]
    u = _mix(h_pre.to(acc).reshape(P, n), xs, xs.new_empty(xs.shape[1:]))
    return u.view(x.shape[1:]).to(x.dtype)


def pre_backward(grad_u: Tensor, x: Tensor, h_pre: Tensor) -> tuple[Tensor, Tensor]:
    acc = compute_dtype(x.dtype)
    xs = flatten_positions(x).to(acc)
    n, P = xs.shape[:2]
    g = grad_u.to(acc).reshape(xs.shape[1:])
    # weights stream-major ([n, P, 1], contiguous) so the product comes out stream-major too
    weights = h_pre.to(acc).reshape(P, n).transpose(0, 1).contiguous()
    grad_x = weights.unsqueeze(-1) * g
    return (
        grad_x.view(x.shape).to(x.dtype),
        _dots(xs, g).reshape(h_pre.shape).to(h_pre.dtype),
    )


def _merge_operands(
    state: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, acc: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The merge's operands in `acc`, positions flattened: a stream state ``[n, P, C]``,
    ``y [P, C]``, ``H_post [P, n]`` and ``H_res [P, n, n]``."""
    states = flatten_positions(state).to(acc)
    n, P = states.shape[:2]
    ys = y.to(acc).reshape(states.shape[1:])
    return states, ys, h_post.to(acc).reshape(P, n), h_res.to(acc).reshape(P, n, n)


def post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    xs, ys, post, res = _merge_operands(x, y, h_post, h_res, compute_dtype(x.dtype))
    n = xs.shape[0]
    out = xs.new_empty(xs.shape)
    for i in range(n):
        _mix(res[:, i], xs, out[i]).addcmul_(post[:, i : i + 1], ys)
    return out.view(x.shape).to(x.dtype)


def post_res_backward(
    grad_out: Tensor, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = compute_dtype(x.dtype)
    gs, ys, post, res = _merge_operands(grad_out, y, h_post, h_res, acc)
    n = gs.shape[0]
    grad_x = gs.new_empty(gs.shape)
    for j in range(n):
        _mix(res[:, :, j], gs, grad_x[j])
    grad_y = _mix(post, gs, ys.new_empty(ys.shape))
    # The n^2 dots as one bmm over positions, [n, C] @ [C, n] each: it reads both states
    # positions-first in place, provided their streams are laid out as BLAS matrices, which a
    # stride-0 (expanded) state is not -- contiguous() copies it once, not once per position.
    xs = flatten_positions(x.contiguous()).to(acc)
    grad_h_res = gs.transpose(0, 1) @ xs.permute(1, 2, 0)
    return (
        grad_x.view(x.shape).to(x.dtype),
        grad_y.view(y.shape).to(y.dtype),
        _dots(gs, ys).reshape(h_post.shape).to(h_post.dtype),
        grad_h_res.reshape(h_res.shape).to(h_res.dtype),
    )
