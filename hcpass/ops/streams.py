"""The stream ops' CPU kernels: ``streams.cpp``, which reads each position's n rows once and
writes every output of that position from them, or `batched` where it cannot be built (or
the tensors are not on CPU).

Same signatures and results as `hcpass.ops.reference` (tests/ops/test_ops.py compares the
three). The kernel computes in `compute_dtype` (fp32, or fp64 for fp64 streams): other
stream dtypes are converted, as `batched` does, and the outputs converted back. It reads a
state in place in any layout whose positions flatten to one stride -- a chain's first site
reads its input expanded to n streams (stream stride 0) -- and copies any other.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from hcpass import native
from hcpass.manifolds.base import compute_dtype, flatten_positions
from hcpass.ops import batched

KERNEL = "ops/streams.cpp"
_INT, _POINTER = ctypes.c_int64, ctypes.c_void_p
# op, double_precision, n, P, C, threads; a and b as (pointer, stream stride, position
# stride); y, h, h_res; four outputs (see the kernel's entry point)
KERNEL_ARGS = (*[_INT] * 6, _POINTER, _INT, _INT, _POINTER, _INT, _INT, *[_POINTER] * 7)
_PRE, _PRE_BACKWARD, _POST_RES, _POST_RES_BACKWARD = range(4)


def _kernel(*tensors: Tensor) -> Callable[..., None] | None:
    if any(t.device.type != "cpu" for t in tensors):
        return None
    return native.load(KERNEL, KERNEL_ARGS)


def _state(x: Tensor, dtype: torch.dtype) -> Tensor:
    """`x` ``[n, *pos, C]`` as ``[n, P, C]`` in `dtype` with a unit channel stride: a view
    where `x` already is one."""
    s = flatten_positions(x.to(dtype))
    return s if s.stride(-1) == 1 else s.contiguous()


def _dense(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).contiguous()


def _call(
    kernel: Callable[..., None],
    op: int,
    a: Tensor,
    b: Tensor | None = None,
    *,
    y: Tensor | None = None,
    h: Tensor | None = None,
    h_res: Tensor | None = None,
    outs: Sequence[Tensor] = (),
) -> None:
    """`op` on the ``[n, P, C]`` states `a` (and `b`) and dense `y`, `h`, `h_res`, writing
    `outs`. The caller holds every tensor: the kernel gets their pointers only."""
    n, P, C = a.shape
    pointer = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    second = (None, 0, 0) if b is None else (b.data_ptr(), b.stride(0), b.stride(1))
    outputs = [pointer(o) for o in outs] + [None] * (4 - len(outs))
    kernel(
        op,
        int(a.dtype == torch.float64),
        n,
        P,
        C,
        torch.get_num_threads(),
        a.data_ptr(),
        a.stride(0),
        a.stride(1),
        *second,
        pointer(y),
        pointer(h),
        pointer(h_res),
        *outputs,
    )


def pre(x: Tensor, h_pre: Tensor) -> Tensor:
    kernel = _kernel(x, h_pre)
    if kernel is None:
        return batched.pre(x, h_pre)
    acc = compute_dtype(x.dtype)
    xs, h = _state(x, acc), _dense(h_pre, acc)
    u = xs.new_empty(xs.shape[1:])
    _call(kernel, _PRE, xs, h=h, outs=(u,))
    return u.view(x.shape[1:]).to(x.dtype)


def pre_backward(grad_u: Tensor, x: Tensor, h_pre: Tensor) -> tuple[Tensor, Tensor]:
    kernel = _kernel(grad_u, x, h_pre)
    if kernel is None:
        return batched.pre_backward(grad_u, x, h_pre)
    acc = compute_dtype(x.dtype)
    xs, g, h = _state(x, acc), _dense(grad_u, acc), _dense(h_pre, acc)
    grad_x, grad_h = xs.new_empty(xs.shape), h.new_empty(h.shape)
    _call(kernel, _PRE_BACKWARD, xs, y=g, h=h, outs=(grad_x, grad_h))
    return grad_x.view(x.shape).to(x.dtype), grad_h.to(h_pre.dtype)


def post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    kernel = _kernel(x, y, h_post, h_res)
    if kernel is None:
        return batched.post_res(x, y, h_post, h_res)
    acc = compute_dtype(x.dtype)
    xs, ys, post, res = _state(x, acc), _dense(y, acc), _dense(h_post, acc), _dense(h_res, acc)
    out = xs.new_empty(xs.shape)
    _call(kernel, _POST_RES, xs, y=ys, h=post, h_res=res, outs=(out,))
    return out.view(x.shape).to(x.dtype)


def post_res_backward(
    grad_out: Tensor, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kernel = _kernel(grad_out, x, y, h_post, h_res)
    if kernel is None:
        return batched.post_res_backward(grad_out, x, y, h_post, h_res)
    acc = compute_dtype(x.dtype)
    gs, xs = _state(grad_out, acc), _state(x, acc)
    ys, post, res = _dense(y, acc), _dense(h_post, acc), _dense(h_res, acc)
    grads = (xs.new_empty(xs.shape), ys.new_empty(ys.shape), post.new_empty(post.shape))
    grads += (res.new_empty(res.shape),)
    _call(kernel, _POST_RES_BACKWARD, gs, xs, y=ys, h=post, h_res=res, outs=grads)
    grad_x, grad_y, grad_post, grad_res = grads
    return (
        grad_x.view(x.shape).to(x.dtype),
        grad_y.view(y.shape).to(y.dtype),
        grad_post.to(h_post.dtype),
        grad_res.to(h_res.dtype),
    )
