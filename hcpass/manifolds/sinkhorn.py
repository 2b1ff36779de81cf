"""mHC (Xie et al., arXiv 2512.24880): H_res = Sinkhorn-Knopp(exp(logits))."""

from __future__ import annotations

import ctypes
import math
from typing import Any

import torch
from torch import Tensor

from hcpass import native
from hcpass.manifolds import register_manifold
from hcpass.manifolds.base import MIXED_DIAGONAL, Manifold, compute_dtype

# Off-diagonal logit of the near-identity init: exp(-8) ~ 3e-4 (the mHC implementations' choice).
OFF_DIAGONAL_LOGIT = -8.0


def _exp_stream_axes_first(logits: Tensor) -> Tensor:
    """``exp(logits - max)`` of ``[..., n, n]`` logits, in fp32 (or fp64), laid out
    ``[n, n, ...]`` and contiguous. With the positions last, each normalisation's sum and
    division run over contiguous length-P vectors; positions-first, every op would reduce or
    broadcast a length-n row per position, several times slower eagerly. The max is
    subtracted so |logit| up to 1e4 stays finite."""
    logits = logits.to(compute_dtype(logits.dtype)).movedim((-2, -1), (0, 1)).contiguous()
    return torch.exp(logits - logits.amax(dim=(0, 1), keepdim=True))


# Floor of a row or column sum: one whose entries all underflowed stays 0, not 0 / 0.
_EPS = 1e-30


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Alternate column then row normalisation of exp(logits), `iters` times, in fp32 (or fp64).

    Ending on the row step makes every row sum to 1 up to rounding, so n identical streams
    stay identical (the function-preservation argument in docs/math.md); columns converge
    to 1 as iterations grow. Works on ``m[i, j, ...]`` (`_exp_stream_axes_first`): a
    column sum is over axis 0, a row sum over axis 1, normalised in place (not for autograd:
    `sinkhorn_vjp` is the backward). Returns ``[..., n, n]``, a view of it.
    """
    m = _exp_stream_axes_first(logits)
    for _ in range(iters):
        m.div_(m.sum(0, keepdim=True).clamp_min_(_EPS))
        m.div_(m.sum(1, keepdim=True).clamp_min_(_EPS))
    return m.movedim((0, 1), (-2, -1))


def sinkhorn_vjp(logits: Tensor, grad: Tensor, iters: int, *, check_clamps: bool = False) -> Tensor:
    """Gradient of `sinkhorn` w.r.t. its logits given ``grad = dL/dH``: the forward again,
    keeping each step's output and sums (2 * iters n x n and n per position), then back
    through the steps in the log domain. With ``u = dL/d(log m)``, a step ``out = m / s``
    (s the sum of m along the step's axis) has ``u_in = u_out - out * sum(u_out)``, the sum
    along that axis: no division, so |u| stays within a factor 2 per step of
    ``|grad * H|`` however saturated H is (entries of 1e-17 and exact zeros next to 1, sums
    near eps). Dividing ``dL/dm`` by those sums instead overflowed fp32. Where the sum was
    clamped (s < eps) the step is a constant scaling and ``u_in = u_out``. It starts from
    ``u = grad * H`` and ends at ``dL/dlogits = u``: ``log m_0 = logits - max``, and the max
    gets no gradient (the map is shift-invariant, its share sums to 0). Stream axes first,
    as in `sinkhorn`; returns ``[..., n, n]``, a view.

    ``check_clamps`` (eager only: it branches on the data) drops the ``[s >= eps]`` masks
    when one check finds no sum below eps, the usual case: at n = 4 each op costs its
    dispatch, not its arithmetic, so the loop runs fewer ops, bit-identical.
    """
    m = _exp_stream_axes_first(logits)
    steps = []
    for k in range(2 * iters):
        total = m.sum(k % 2, keepdim=True)
        m = m / total.clamp_min(_EPS)
        steps.append((k % 2, total, m))
    active = None
    if not check_clamps or bool((torch.cat([t.view(-1) for _, t, _ in steps]) < _EPS).any()):
        active = [total >= _EPS for _, total, _ in steps]
    u = grad.to(m.dtype).movedim((-2, -1), (0, 1)) * m
    for k in reversed(range(2 * iters)):
        axis, _, out = steps[k]
        share = u.sum(axis, keepdim=True)
        if active is not None:
            share = torch.where(active[k], share, 0.0)
        u = u.sub_(out * share)
    return u.movedim((0, 1), (-2, -1))


# `sinkhorn` as ops of their own, so that torch.compile sees one call, not the unrolled
# iterations: traced on CPU, the 2 * iters normalisations and their backward became two C++
# kernels of ~1.4k and ~4k lines for Inductor to generate and compile (a third of a converted
# model's cold compile, docs/performance.md) that ran no faster than the reference run
# eagerly. On CPU the ops run sinkhorn.cpp (the same steps, a block of positions at a time
# in SIMD lanes, 4-8x faster than the reference); elsewhere, or where it cannot be built,
# the reference above.
@torch.library.custom_op("hcpass::sinkhorn", mutates_args=())
def sinkhorn_op(logits: Tensor, iters: int) -> Tensor:
    out = _cpu_kernel(logits, None, iters)
    if out is not None:
        return out
    return sinkhorn(logits, iters).contiguous()


@torch.library.custom_op("hcpass::sinkhorn_backward", mutates_args=())
def sinkhorn_backward_op(logits: Tensor, grad: Tensor, iters: int) -> Tensor:
    out = _cpu_kernel(logits, grad, iters)
    if out is not None:
        return out
    return sinkhorn_vjp(logits, grad, iters, check_clamps=True).contiguous()


_CPU_KERNEL = "manifolds/sinkhorn.cpp"
_CPU_KERNEL_ARGS = (*[ctypes.c_void_p] * 3, *[ctypes.c_int64] * 6)


def _cpu_kernel(logits: Tensor, grad: Tensor | None, iters: int) -> Tensor | None:
    """sinkhorn.cpp's forward (`grad` None) or backward of ``[..., n, n]`` logits on CPU, in
    `compute_dtype`; None where it does not apply (another device, no kernel)."""
    if logits.device.type != "cpu":
        return None
    kernel = native.load(_CPU_KERNEL, _CPU_KERNEL_ARGS)
    if kernel is None:
        return None
    dtype = compute_dtype(logits.dtype)
    logits = logits.to(dtype).contiguous()
    n = logits.shape[-1]
    out = torch.empty_like(logits)
    kind = 0 if grad is None else 1
    grad = logits if grad is None else grad.to(dtype).contiguous()
    pointers = (logits.data_ptr(), grad.data_ptr(), out.data_ptr())
    double = int(dtype == torch.float64)
    kernel(*pointers, logits.numel() // (n * n), n, iters, torch.get_num_threads(), kind, double)
    return out


@sinkhorn_op.register_fake
@sinkhorn_backward_op.register_fake
def _(logits: Tensor, *args: Any) -> Tensor:
    if logits.device.type == "cpu":  # a trace that will call the CPU kernel: build it meanwhile
        native.prefetch(_CPU_KERNEL, _CPU_KERNEL_ARGS)
    return logits.new_empty(logits.shape, dtype=compute_dtype(logits.dtype))


class UnrolledSinkhorn(torch.autograd.Function):
    """`sinkhorn` through the two ops, differentiated by `sinkhorn_vjp` from the logits alone.
    An autograd.Function rather than the op's own autograd registration: torch.func
    transforms (`Manifold._coefficients_vjp`) go through a Function, not through a custom
    op's registered backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, iters: int) -> Tensor:
        return sinkhorn_op(logits, iters)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, int], output: Tensor) -> None:
        logits, ctx.iters = inputs
        ctx.save_for_backward(logits)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (logits,) = ctx.saved_tensors
        return sinkhorn_backward_op(logits, grad, ctx.iters).to(logits.dtype), None


# `sinkhorn` and its backward as the Triton epilogue of the fused coefficient kernels (see
# Manifold.triton_res_map). The backward recomputes instead of storing the 2 * iters
# intermediate matrices: before stepping back through iteration t it rebuilds t's input from
# exp(logits), O(iters^2) normalisations of an n x n tile in registers per position -- cheap
# next to the kernel's pass over the n*C state, and nothing but the inputs is saved. It steps
# back in the log domain, as `sinkhorn_vjp` does: no division by a row or column sum.
TRITON_SINKHORN = """
@triton.jit
def _sinkhorn_valid(logits, N: tl.constexpr):
    idx = tl.arange(0, logits.shape[1])
    return ((idx[:, None] < N) & (idx[None, :] < N))[None, :, :]


@triton.jit
def _sinkhorn_exp(logits, N: tl.constexpr):
    # exp(logits - max) on the n x n entries, exactly 0 on the padding
    logits = tl.where(_sinkhorn_valid(logits, N), logits, float("-inf"))
    top = tl.max(tl.max(logits, axis=2), axis=1)
    return tl.exp(logits - top[:, None, None])


@triton.jit
def _sinkhorn_iterate(m, count):
    for _ in range(count):
        m = m / tl.maximum(tl.sum(m, axis=1, keep_dims=True), 1e-30)
        m = m / tl.maximum(tl.sum(m, axis=2, keep_dims=True), 1e-30)
    return m


@triton.jit
def _sinkhorn_iteration_back(m, u, FIRST: tl.constexpr):
    # m: an iteration's input; u: dL/d(log) of its output, or (FIRST) dL/d its output, H.
    # Each step out = m / s gives u_in = u_out - out * sum(u_out) where the sum s >= eps (a
    # clamped step is a constant scaling): no division, so u stays finite. The padding's m
    # and gradient are 0, so its u stays 0.
    col = tl.sum(m, axis=1, keep_dims=True)
    m = m / tl.maximum(col, 1e-30)
    row = tl.sum(m, axis=2, keep_dims=True)
    out = m / tl.maximum(row, 1e-30)
    if FIRST:
        u = u * out
    u = u - out * tl.where(row >= 1e-30, tl.sum(u, axis=2, keep_dims=True), 0.0)
    return u - m * tl.where(col >= 1e-30, tl.sum(u, axis=1, keep_dims=True), 0.0)


@triton.jit
def res_map(logits, N: tl.constexpr, S: tl.constexpr):
    return _sinkhorn_iterate(_sinkhorn_exp(logits, N), {iters})


@triton.jit
def res_map_vjp(logits, grad, N: tl.constexpr, S: tl.constexpr):
    m0 = _sinkhorn_exp(logits, N)
    u = _sinkhorn_iteration_back(_sinkhorn_iterate(m0, {iters} - 1), grad, True)
    for back in range(1, {iters}):
        u = _sinkhorn_iteration_back(_sinkhorn_iterate(m0, {iters} - 1 - back), u, False)
    # dL/dlogits = dL/d(log m0): the max subtracted gets no gradient (shift-invariant map)
    return u
"""


SINKHORN_BACKWARDS = ("unrolled", "implicit")


def sinkhorn_fixed_point_vjp(p: Tensor, grad: Tensor) -> Tensor:
    """Gradient w.r.t. the logits of the Sinkhorn fixed point P = diag(e^f) exp(logits) diag(e^g)
    (rows and columns sum to 1), given ``grad = dL/dP``, by the implicit function theorem.

    Differentiating the two marginal constraints gives, with ``G^ = P * grad``,
    ``[[I, P], [P^T, I]] [a; b] = [G^ 1; G^T 1]`` and ``dL/dlogits = P * (grad - a 1^T - 1 b^T)``.
    Eliminating a leaves ``(I - P^T P) b = G^T 1 - P^T G^ 1``, singular along b -> b + t 1 (a
    gauge the result does not see); adding ``11^T/n`` removes that null direction. The pinv
    also copes with the extra null directions of a P whose support splits into blocks
    (saturated logits), where every solution gives the same gradient.
    """
    n = p.shape[-1]
    weighted = p * grad
    row, col = weighted.sum(-1), weighted.sum(-2)
    rhs = col - (p.transpose(-2, -1) @ row.unsqueeze(-1)).squeeze(-1)
    eye = torch.eye(n, dtype=p.dtype, device=p.device)
    system = eye + 1.0 / n - p.transpose(-2, -1) @ p
    b = (torch.linalg.pinv(system, hermitian=True) @ rhs.unsqueeze(-1)).squeeze(-1)
    a = row - (p @ b.unsqueeze(-1)).squeeze(-1)
    return p * (grad - a.unsqueeze(-1) - b.unsqueeze(-2))


class ImplicitSinkhorn(torch.autograd.Function):
    """`sinkhorn` whose backward differentiates the fixed point (JPmHC) instead of the
    iterations: it saves only the output P, O(n^2) per position whatever `iters` is. Exact
    for a converged P; with few iterations it is the gradient of the limit, not of the
    truncated forward. Forward and setup_context are split (and the vmap rule generated)
    so it also works under torch.func transforms, which `coeffs_backward` uses."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, iters: int) -> Tensor:
        return sinkhorn(logits, iters)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, int], output: Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (p,) = ctx.saved_tensors
        return sinkhorn_fixed_point_vjp(p, grad), None


@register_manifold
class Sinkhorn(Manifold):
    name = "sinkhorn"
    aliases = ("mhc",)
    description = "mHC: doubly stochastic H_res by Sinkhorn-Knopp (approximate, t_max iterations)"
    option_defaults = {"sinkhorn_iters": 20, "sinkhorn_backward": "unrolled"}

    def validate(self) -> None:
        iters = self.options["sinkhorn_iters"]
        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
            raise ValueError(f"sinkhorn_iters must be an integer >= 1, got {iters!r}")
        backward = self.options["sinkhorn_backward"]
        if backward not in SINKHORN_BACKWARDS:
            raise ValueError(
                f"sinkhorn_backward must be one of {SINKHORN_BACKWARDS}, got {backward!r}"
            )

    @property
    def res_logits(self) -> int:
        return self.streams * self.streams

    def res_map(self, logits: Tensor) -> Tensor:
        n = self.streams
        matrix = logits.unflatten(-1, (n, n))
        if torch.compiler.is_exporting():
            # torch.export records the iterations as ATen ops: the program runs without
            # hcpass (docs/deployment.md). Both backwards share this forward.
            return sinkhorn(matrix, self.options["sinkhorn_iters"])
        if self.options["sinkhorn_backward"] == "implicit":
            # Cast outside the Function: autograd's cast node hands back the logits' dtype.
            matrix = matrix.to(compute_dtype(matrix.dtype))
            return ImplicitSinkhorn.apply(matrix, self.options["sinkhorn_iters"])
        if not (torch.is_grad_enabled() and matrix.requires_grad) and (
            torch._C._functorch.peek_interpreter_stack() is None  # vmap needs the Function
        ):
            # Nothing to differentiate (inference, or inside the coeffs op, whose backward
            # is its own op): the op without the Function's per-call cost (binding its
            # signature, the autograd node), which at one position is most of res_map's time.
            return sinkhorn_op(matrix, self.options["sinkhorn_iters"])
        return UnrolledSinkhorn.apply(matrix, self.options["sinkhorn_iters"])

    def res_map_backward(self, logits: Tensor, grad: Tensor) -> Tensor:
        n = self.streams
        matrix = logits.unflatten(-1, (n, n))
        iters = self.options["sinkhorn_iters"]
        if self.options["sinkhorn_backward"] == "implicit":
            return sinkhorn_fixed_point_vjp(sinkhorn(matrix, iters), grad).flatten(-2)
        # The op, not `sinkhorn_vjp`: run eagerly (the coeffs_backward kernel) it drops the
        # clamp masks where no sum was clamped; traced, it stays one node.
        return sinkhorn_backward_op(matrix, grad, iters).flatten(-2)

    def res_identity_bias(self) -> Tensor:
        n = self.streams
        eye = torch.eye(n)
        return (eye * 0.0 + (1 - eye) * OFF_DIAGONAL_LOGIT).flatten()

    def res_init_bias(self) -> Tensor:
        # exp of [[0, a], [a, 0]]-shaped logits is symmetric with equal row sums, so already
        # doubly stochastic: diagonal 1 / (1 + (n - 1) e^a) = MIXED_DIAGONAL.
        n = self.streams
        if n == 1:
            return self.res_identity_bias()
        off = math.log((1 - MIXED_DIAGONAL) / ((n - 1) * MIXED_DIAGONAL))
        eye = torch.eye(n)
        return ((1 - eye) * off).flatten()

    def triton_res_map(self) -> str | None:
        # The implicit (fixed-point) backward has no Triton version: it runs in PyTorch.
        if self.options["sinkhorn_backward"] != "unrolled":
            return None
        return TRITON_SINKHORN.format(iters=self.options["sinkhorn_iters"])
