"""Launchers of the generated kernels, with exactly the signatures of `hcpass.ops.reference`.

On CUDA tensors they run compiled Triton kernels. In a process that imported triton with
``TRITON_INTERPRET=1`` they run the same kernels through Triton's interpreter, on CPU tensors
(tests; ~1 ms per program instance); otherwise CPU tensors are refused.

Coefficients for a manifold that does not use the shared mHC projection (HC projects each
stream on its own) come from the PyTorch reference; a manifold without a Triton H_res
epilogue gets the projection, sigmoids and bias from the kernel and its `res_map` in PyTorch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from hcpass.manifolds import resolve
from hcpass.manifolds.base import RMS_EPS, Manifold, compute_dtype
from hcpass.ops import reference

from . import generate

# Programs per SM that pass 2 of coeffs_backward aims for when splitting positions, and the
# program count it aims for on the interpreter, which has no SMs to fill.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 8
# Nominal BLOCK_C of that estimate (the autotuner picks the real one after the split is fixed).
NOMINAL_BLOCK_C = 64


# ----------------------------------------------------------------------------- helpers
def _check_device(*tensors: Tensor) -> None:
    if not generate.interpreted() and any(t.device.type != "cuda" for t in tensors):
        raise RuntimeError(
            "hcpass.codegen kernels run on CUDA tensors; to run them on CPU tensors through "
            "Triton's interpreter (slow: for tests), set TRITON_INTERPRET=1 before triton is "
            "imported"
        )


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(n))


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def _dot_precision(dtype: torch.dtype) -> str:
    # 16-bit streams: phi in tf32, as in the mHC paper; fp32/fp64 streams: exact products.
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"


def _contiguous(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    return tuple(t.contiguous() if t is not None else None for t in tensors)


def _stream_shape(x: Tensor) -> tuple[int, int, int]:
    """(n, P, C) of a stream-major ``[n, *pos, C]`` state."""
    return x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _shared_projection(manifold: Manifold) -> bool:
    """Whether `manifold` computes its logits the way the coefficient kernels do."""
    cls = type(manifold)
    shared = ("phi_shape", "project", "split", "coefficients")
    return all(getattr(cls, name) is getattr(Manifold, name) for name in shared)


class _Coeffs:
    """Shapes and compile-time constants of one coefficient-kernel launch."""

    def __init__(
        self, manifold: Manifold, x: Tensor, phi: Tensor | None, alpha: Tensor | None, bias: Tensor
    ) -> None:
        self.epilogue = manifold.triton_res_map()
        self.n, self.P, self.C = _stream_shape(x)
        n, R = self.n, manifold.res_logits
        layout = manifold.triton_res_layout
        if layout not in ("square", "flat"):
            raise ValueError(
                f"manifold {manifold.name!r}: triton_res_layout must be 'square' or 'flat', "
                f"got {layout!r}"
            )
        # a square epilogue reads the res logits as an n x n tile
        self.square = self.fused and layout == "square"
        if self.square and R != n * n:
            raise ValueError(
                f"manifold {manifold.name!r} has a square Triton epilogue but {R} != n*n res "
                "logits (declare triton_res_layout = 'flat')"
            )
        self.R, self.K = R, 2 * n + R
        if bias.numel() != self.K:
            raise ValueError(f"bias has {bias.numel()} logits, manifold needs {self.K}")
        if phi is not None:
            if tuple(phi.shape) != (n * self.C, self.K):
                raise ValueError(f"phi is {tuple(phi.shape)}, expected {(n * self.C, self.K)}")
            if alpha is None or alpha.numel() != 3:
                raise ValueError("a dynamic mixer (phi given) needs alpha with 3 entries")
        self.pos = tuple(x.shape[1:-1])
        self.acc = compute_dtype(x.dtype)
        # S: side of the padded H_res tile; W, RW: tile widths (tl.dot needs >= 16).
        S = max(4, _pow2(n))
        self.constants = dict(
            N=n,
            C=self.C,
            R=R,
            S=S,
            W=max(16, _pow2(n)),
            RW=S * S if self.square else _pow2(R, 16),
            HAS_PHI=phi is not None,
            FUSED=self.fused,
            SQUARE=self.square,
            EPS=RMS_EPS,
            ACC=_acc(x.dtype),
            DOT=_dot_precision(x.dtype),
        )

    @property
    def fused(self) -> bool:
        return self.epilogue is not None

    def buffers(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Empty H_pre, H_post and H_res (raw res logits ``[P, R]`` if unfused)."""
        n, acc = self.n, self.acc
        res_shape = (*self.pos, n, n) if self.fused else (self.P, self.R)
        new = lambda shape: x.new_empty(shape, dtype=acc)
        return new((*self.pos, n)), new((*self.pos, n)), new(res_shape)

    @staticmethod
    def parameters(
        phi: Tensor | None, alpha: Tensor | None, bias: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The kernels' (phi, alpha, bias) pointers. A static mixer has no phi or alpha: bias
        stands in for their pointers, never read (HAS_PHI is False)."""
        return bias if phi is None else phi, bias if alpha is None else alpha, bias

    def grid(self, meta: dict) -> tuple[int]:
        return (triton.cdiv(self.P, meta["BLOCK_P"]),)

    def kernel(self, name: str) -> Callable:
        return generate.kernel(name, self.epilogue)[self.grid]


# ------------------------------------------------------------------------ coefficients
def coeffs(
    x: Tensor, phi: Tensor | None, alpha: Tensor | None, bias: Tensor, manifold: str
) -> tuple[Tensor, Tensor, Tensor]:
    m = resolve(manifold)
    if not _shared_projection(m):
        return reference.coeffs(x, phi, alpha, bias, manifold)
    x, phi, alpha, bias = _contiguous(x, phi, alpha, bias)
    shape = _Coeffs(m, x, phi, alpha, bias)
    _check_device(*(t for t in (x, phi, alpha, bias) if t is not None))
    h_pre, h_post, h_res = _coeffs_forward(shape, x, phi, alpha, bias)
    if not shape.fused:
        h_res = m.res_map(h_res).reshape(*shape.pos, shape.n, shape.n).contiguous()
    return h_pre, h_post, h_res


def _coeffs_forward(
    shape: _Coeffs, x: Tensor, phi: Tensor | None, alpha: Tensor | None, bias: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Run coeffs_fwd: (H_pre, H_post, H_res), or raw res logits ``[P, R]`` if unfused."""
    coefficients = shape.buffers(x)
    shape.kernel("coeffs_fwd")(
        x, *shape.parameters(phi, alpha, bias), *coefficients, shape.P, **shape.constants
    )
    return coefficients


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
    m = resolve(manifold)
    if not _shared_projection(m):
        return reference.coeffs_backward(
            grad_pre, grad_post, grad_res, x, phi, alpha, bias, manifold
        )
    x, phi, alpha, bias = _contiguous(x, phi, alpha, bias)
    shape = _Coeffs(m, x, phi, alpha, bias)
    _check_device(*(t for t in (x, phi, alpha, bias) if t is not None))
    n, P, C, K, acc = shape.n, shape.P, shape.C, shape.K, shape.acc
    if shape.fused:
        g_res = grad_res.contiguous()
    else:
        # The PyTorch res_map needs its input: recompute the raw logits (one more read of x).
        logits = _coeffs_forward(shape, x, phi, alpha, bias)[2]
        _, vjp = torch.func.vjp(m.res_map, logits)
        (g_res,) = vjp(grad_res.reshape(P, n, n).to(acc))
        g_res = g_res.contiguous()

    # Pass 1: recompute, back through the maps; per-program partial sums of dalpha, dbias.
    programs = triton.cdiv(P, generate.min_block_p("coeffs_bwd_logits"))
    dalpha = x.new_zeros((programs, 4), dtype=acc)
    dbias = x.new_zeros((programs, K), dtype=acc)
    dz = x.new_empty((P, K) if phi is not None else (0,), dtype=acc)
    coef = x.new_empty((P,) if phi is not None else (0,), dtype=acc)
    shape.kernel("coeffs_bwd_logits")(
        x,
        *shape.parameters(phi, alpha, bias),
        grad_pre.contiguous(),
        grad_post.contiguous(),
        g_res,
        dz,
        coef,
        dalpha,
        dbias,
        P,
        **shape.constants,
    )
    grad_bias = dbias.sum(0).to(bias.dtype)
    if phi is None:
        # a static mixer's coefficients do not depend on x
        return torch.zeros_like(x), x.new_empty(0), x.new_empty(0), grad_bias
    grad_alpha = dalpha[:, :3].sum(0).to(alpha.dtype)

    # Pass 2: dx and the dphi partials, read x once more.
    split = _split(P, n, C, x.device)
    dx = torch.empty_like(x)
    dphi = x.new_empty((split, n * C, K), dtype=acc)
    grid = lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), n, split)
    generate.kernel("coeffs_bwd_x", None)[grid](
        x,
        phi,
        dz,
        coef,
        dx,
        dphi,
        P,
        split,
        N=n,
        C=C,
        K=K,
        KP=_pow2(K, 16),
        ACC=shape.constants["ACC"],
        DOT=shape.constants["DOT"],
    )
    return dx, dphi.sum(0).to(phi.dtype), grad_alpha, grad_bias


def _split(P: int, n: int, C: int, device: torch.device) -> int:
    """Position ranges pass 2 splits dphi's reduction into: one per program until the
    (C-slice, stream) tiles alone fill the device."""
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * _sm_count(device.index or 0)
    else:
        target = INTERPRETER_PROGRAMS
    tiles = n * triton.cdiv(C, NOMINAL_BLOCK_C)
    blocks = triton.cdiv(P, generate.min_block_p("coeffs_bwd_x"))
    return max(1, min(blocks, triton.cdiv(target, tiles)))


# ------------------------------------------------------------------------------ streams
def _stream_grid(P: int, C: int) -> Callable[[dict], tuple[int, int]]:
    return lambda meta: (triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_C"]))


def _position_grid(P: int) -> Callable[[dict], tuple[int]]:
    return lambda meta: (triton.cdiv(P, meta["BLOCK_P"]),)


def _stream_constants(x: Tensor) -> dict:
    n, _, C = _stream_shape(x)
    return dict(N=n, C=C, NP=_pow2(n), ACC=_acc(x.dtype))


def pre(x: Tensor, h_pre: Tensor) -> Tensor:
    x, h_pre = _contiguous(x, h_pre)
    _check_device(x, h_pre)
    _, P, C = _stream_shape(x)
    u = x.new_empty(x.shape[1:])
    generate.kernel("pre_fwd", None)[_stream_grid(P, C)](x, h_pre, u, P, **_stream_constants(x))
    return u


def pre_backward(grad_u: Tensor, x: Tensor, h_pre: Tensor) -> tuple[Tensor, Tensor]:
    grad_u, x, h_pre = _contiguous(grad_u, x, h_pre)
    _check_device(grad_u, x, h_pre)
    _, P, _ = _stream_shape(x)
    grad_x, grad_h_pre = torch.empty_like(x), torch.empty_like(h_pre)
    generate.kernel("pre_bwd", None)[_position_grid(P)](
        grad_u, x, h_pre, grad_x, grad_h_pre, P, **_stream_constants(x)
    )
    return grad_x, grad_h_pre


def post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    x, y, h_post, h_res = _contiguous(x, y, h_post, h_res)
    _check_device(x, y, h_post, h_res)
    _, P, C = _stream_shape(x)
    out = torch.empty_like(x)
    generate.kernel("post_res_fwd", None)[_stream_grid(P, C)](
        x, y, h_post, h_res, out, P, **_stream_constants(x)
    )
    return out


def post_res_backward(
    grad_out: Tensor, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    tensors = _contiguous(grad_out, x, y, h_post, h_res)
    grad_out, x, y, h_post, h_res = tensors
    _check_device(*tensors)
    _, P, _ = _stream_shape(x)
    grads = [torch.empty_like(t) for t in (x, y, h_post, h_res)]
    generate.kernel("post_res_bwd", None)[_position_grid(P)](
        *tensors, *grads, P, **_stream_constants(x)
    )
    return tuple(grads)


# ----------------------------------------------------------------------- site boundary
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
    m = resolve(manifold)
    if not _shared_projection(m) or m.triton_res_map() is None:
        # no H_res epilogue to put in one kernel: the boundary runs as its three launchers
        out = post_res(x, y, h_post, h_res)
        h_pre, h_post_next, h_res_next = coeffs(out, phi, alpha, bias, manifold)
        return out, h_pre, h_post_next, h_res_next, pre(out, h_pre)
    x, y, h_post, h_res, phi, alpha, bias = _contiguous(x, y, h_post, h_res, phi, alpha, bias)
    shape = _Coeffs(m, x, phi, alpha, bias)
    _check_device(*(t for t in (x, y, h_post, h_res, phi, alpha, bias) if t is not None))
    out = torch.empty_like(x)
    u = x.new_empty(x.shape[1:])
    coefficients = shape.buffers(x)
    shape.kernel("post_res_coeffs_pre_fwd")(
        x,
        y,
        h_post,
        h_res,
        *shape.parameters(phi, alpha, bias),
        out,
        *coefficients,
        u,
        shape.P,
        NP=_pow2(shape.n),
        **shape.constants,
    )
    return out, *coefficients, u


# op name -> launcher: what `register_cuda_kernels` installs as the ops' CUDA kernels.
LAUNCHERS: dict[str, Callable] = {
    "coeffs": coeffs,
    "coeffs_backward": coeffs_backward,
    "pre": pre,
    "pre_backward": pre_backward,
    "post_res": post_res,
    "post_res_backward": post_res_backward,
    "post_res_coeffs_pre": post_res_coeffs_pre,
}
