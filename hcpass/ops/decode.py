"""A site's mixer work at a few positions as one native call: the eager runtime's inference
path (a decoding step reads one position per sequence).

At one position the arithmetic of a site is a few thousand multiply-adds, and each op costs
its dispatch: the ``hcpass::`` ops a hyper-connection site runs (``coeffs``: the projection's
~10 ATen ops, the logit maps, Sinkhorn; ``pre``; ``post_res``) cost ~250 µs on CPU, and a
custom op's Python dispatch alone ~15 µs a call. The eager runtime calls these functions in
their place (`hcpass.runtime.decode`):

- `site_read`: ``coeffs`` then ``pre`` -> ``(H_pre, H_post, H_res, u)``;
- `merge_read`: ``post_res`` of one site then the next site's ``coeffs`` and ``pre`` of its
  result -> ``(X', H_pre, H_post, H_res, u)`` (`reference.post_res_coeffs_pre`);
- `merge`: ``post_res``;
- `attnres`: ``hcpass::attnres``.

Each computes what the ops compute, in one call of ``decode.cpp`` (``attnres/decode.cpp``)
where `inference` holds -- nothing to differentiate, no dispatch or function mode watching
the ops (``hcpass.mixers`` observes them), no autocast, plain CPU tensors of one dtype (fp32
or fp64), at most `MAX_POSITIONS` positions, a manifold the kernel knows -- and calls the
ops otherwise (then the ops' own autograd, kernels and fallbacks apply). Where the kernel
cannot be built (`hcpass.native`), always the ops.

The kernels sum in the order of the ops' CPU kernels; the projection and the mean squares,
which the ops leave to ATen, differ by rounding (tests/ops/test_decode_ops.py: within 1e-6 of
the reference in fp32, 1e-12 in fp64).
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hcpass import native
from hcpass.manifolds import resolve
from hcpass.manifolds.base import RMS_EPS, Manifold, flatten_positions
from hcpass.manifolds.sinkhorn import Sinkhorn

OPS = torch.ops.hcpass

# Above this many positions the ops run: their kernels use BLAS and threads, this one
# neither (it is written for the one position of a decoding step).
MAX_POSITIONS = 64

KERNEL = "ops/decode.cpp"
ATTNRES_KERNEL = "ops/attnres/decode.cpp"
_INT, _POINTER, _DOUBLE = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
# double_precision, n, P, C; x (pointer, stream stride, position stride); y, h_post_in,
# h_res_in, merged; phi, alpha, bias, k, iters, rms_eps; h_pre, h_post, h_res, u
KERNEL_ARGS = (*[_INT] * 4, _POINTER, _INT, _INT, *[_POINTER] * 7, _INT, _INT, _DOUBLE)
KERNEL_ARGS += (_POINTER,) * 4
# double_precision, k, P, C, values (pointers), w, eps, h
ATTNRES_KERNEL_ARGS = (*[_INT] * 4, _POINTER, _POINTER, _DOUBLE, _POINTER)
# decode.cpp's scratch bounds: logits of one position, values of one attnres
_MAX_LOGITS, _MAX_VALUES = 1024, 4096
_FLOATING = (torch.float32, torch.float64)
_PLAIN = (Tensor, torch.nn.Parameter)  # not a subclass that dispatches (DTensor)


def prefetch() -> None:
    """Start building both kernels in the background (`native.prefetch`): the eager runtime
    calls this when it rewrites a graph, so the first decoding step does not wait for them."""
    native.prefetch(KERNEL, KERNEL_ARGS)
    native.prefetch(ATTNRES_KERNEL, ATTNRES_KERNEL_ARGS)


def inference(x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether the native path may run on the stream state `x` and `tensors` (None: an
    absent parameter): see the module docstring. Plain loops: this runs at every call."""
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return False
    dtype = x.dtype
    if dtype not in _FLOATING or torch.is_autocast_enabled("cpu"):
        return False
    grad = torch.is_grad_enabled()
    for t in (x, *tensors):
        if t is None:
            continue
        if type(t) not in _PLAIN or t.dtype != dtype or t.device.type != "cpu":
            return False
        if grad and t.requires_grad:
            return False
    return True


@dataclass(frozen=True)
class _Coefficients:
    """How decode.cpp computes a manifold's coefficients: it computes the logits, H_pre and
    H_post of every manifold that keeps `Manifold`'s projection and maps, and Sinkhorn's
    H_res (`iters` > 0); any other H_res map (`res_map`) runs on the logits it returns."""

    streams: int
    logits: int
    iters: int
    res_map: Callable[[Tensor], Tensor] | None


@functools.cache
def _coefficients(spec: str) -> _Coefficients | None:
    manifold = resolve(spec)
    kind = type(manifold)
    if any(getattr(kind, f) is not getattr(Manifold, f) for f in ("coefficients", "project")):
        return None  # a manifold with its own coefficients (HC): the ops
    if kind.split is not Manifold.split or manifold.num_logits > _MAX_LOGITS:
        return None
    if kind is Sinkhorn:
        return _Coefficients(
            manifold.streams, manifold.num_logits, manifold.options["sinkhorn_iters"], None
        )
    return _Coefficients(manifold.streams, manifold.num_logits, 0, manifold.res_map)


def _state(x: Tensor) -> Tensor:
    """`x` as ``[n, P, C]`` with a unit channel stride (a view where it is one)."""
    s = flatten_positions(x)
    return s if s.stride(-1) == 1 else s.contiguous()


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _native(
    x: Tensor,
    merge: tuple[Tensor, Tensor, Tensor] | None,
    read: tuple[Tensor | None, Tensor | None, Tensor, str] | None,
) -> tuple[Tensor | None, ...] | None:
    """decode.cpp on `x` ``[n, *pos, C]``: the merge with ``(y, H_post, H_res)`` if given,
    then the read with ``(phi, alpha, bias, manifold)`` if given. Returns
    ``(X' or None, H_pre, H_post, H_res, u)`` (the last four None without a read), or None
    where it does not apply."""
    positions = x.shape[1:-1]
    if math.prod(positions) > MAX_POSITIONS:
        return None
    coefficients = None
    if read is not None:
        phi, alpha, bias, spec = read
        coefficients = _coefficients(spec)
        if coefficients is None or not inference(x, *(merge or ()), phi, alpha, bias):
            return None
    elif not inference(x, *merge):
        return None
    kernel = native.load(KERNEL, KERNEL_ARGS)
    if kernel is None:
        return None
    state = _state(x)
    n, P, C = state.shape
    merged = y = h_post_in = h_res_in = None
    if merge is not None:
        y, h_post_in, h_res_in = (t.contiguous() for t in merge)
        merged = x.new_empty(x.shape)
    h_pre = h_post = h_res = u = None
    phi = alpha = bias = None
    iters, logits = 0, 0
    if coefficients is not None:
        phi, alpha, bias, _ = read
        phi, alpha, bias = (None if t is None else t.contiguous() for t in (phi, alpha, bias))
        iters, logits = coefficients.iters, coefficients.logits
        h_pre, h_post = x.new_empty((*positions, n)), x.new_empty((*positions, n))
        h_res = x.new_empty((*positions, logits - 2 * n))
        u = x.new_empty((*positions, C))
    kernel(
        int(x.dtype == torch.float64),
        n,
        P,
        C,
        state.data_ptr(),
        state.stride(0),
        state.stride(1),
        _pointer(y),
        _pointer(h_post_in),
        _pointer(h_res_in),
        _pointer(merged),
        _pointer(phi),
        _pointer(alpha),
        _pointer(bias),
        logits,
        iters,
        RMS_EPS,
        _pointer(h_pre),
        _pointer(h_post),
        _pointer(h_res),
        _pointer(u),
    )
    if h_res is not None:
        if coefficients.res_map is not None:
            h_res = coefficients.res_map(h_res).contiguous()
        else:
            h_res = h_res.view(*positions, n, n)
    return merged, h_pre, h_post, h_res, u


def site_read(
    x: Tensor, phi: Tensor | None, alpha: Tensor | None, bias: Tensor, manifold: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``hcpass::coeffs`` of the state `x`, then ``hcpass::pre`` with its H_pre:
    ``(H_pre, H_post, H_res, u)``."""
    out = _native(x, None, (phi, alpha, bias, manifold))
    if out is not None:
        return out[1:]
    h_pre, h_post, h_res = OPS.coeffs.default(x, phi, alpha, bias, manifold)
    return h_pre, h_post, h_res, OPS.pre.default(x, h_pre)


def merge_read(
    x: Tensor,
    y: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    phi: Tensor | None,
    alpha: Tensor | None,
    bias: Tensor,
    manifold: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``hcpass::post_res``, then `site_read` of its result: ``(X', H_pre, H_post, H_res, u)``."""
    out = _native(x, (y, h_post, h_res), (phi, alpha, bias, manifold))
    if out is not None:
        return out
    merged = OPS.post_res.default(x, y, h_post, h_res)
    return merged, *site_read(merged, phi, alpha, bias, manifold)


def merge(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """``hcpass::post_res``."""
    out = _native(x, (y, h_post, h_res), None)
    if out is not None:
        return out[0]
    return OPS.post_res.default(x, y, h_post, h_res)


def attnres(values: Sequence[Tensor], query: Tensor, eps: float) -> Tensor:
    """``hcpass::attnres``."""
    out = _attnres_native(values, query, eps)
    if out is not None:
        return out
    return OPS.attnres.default(values, query, eps)


def _attnres_native(values: Sequence[Tensor], query: Tensor, eps: float) -> Tensor | None:
    if not 2 <= len(values) <= _MAX_VALUES or not inference(query, *values):
        return None
    first = values[0]
    shape = first.shape
    if shape[-1:] != query.shape or any(v.shape != shape for v in values):
        return None  # the op reports the mismatch
    positions = math.prod(shape[:-1])
    if positions > MAX_POSITIONS:
        return None
    kernel = native.load(ATTNRES_KERNEL, ATTNRES_KERNEL_ARGS)
    if kernel is None:
        return None
    # The blocks' outputs, contiguous at a decoding step; copies held until the call returns.
    rows = [v if v.is_contiguous() else v.contiguous() for v in values]
    k = len(rows)
    pointers = (ctypes.c_void_p * k)(*[r.data_ptr() for r in rows])
    w = query.contiguous()
    h = first.new_empty(shape)
    kernel(
        int(first.dtype == torch.float64),
        k,
        positions,
        shape[-1],
        ctypes.addressof(pointers),
        w.data_ptr(),
        eps,
        h.data_ptr(),
    )
    return h
