"""The ``hcpass::`` custom ops: one schema, a reference kernel, fake kernels, autograd.

Forward and backward are separate ops so a back end can replace each (the CUDA path
registers generated Triton kernels for all six); autograd wires them together.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcpass.manifolds.base import compute_dtype
from hcpass.ops import reference


@torch.library.custom_op("hcpass::coeffs", mutates_args=())
def coeffs(
    x: Tensor, phi: Tensor | None, alpha: Tensor | None, bias: Tensor, manifold: str
) -> tuple[Tensor, Tensor, Tensor]:
    return reference.coeffs(x, phi, alpha, bias, manifold)


@torch.library.custom_op("hcpass::coeffs_backward", mutates_args=())
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
    return reference.coeffs_backward(grad_pre, grad_post, grad_res, x, phi, alpha, bias, manifold)


@torch.library.custom_op("hcpass::pre", mutates_args=())
def pre(x: Tensor, h_pre: Tensor) -> Tensor:
    return reference.pre(x, h_pre)


@torch.library.custom_op("hcpass::pre_backward", mutates_args=())
def pre_backward(grad_u: Tensor, x: Tensor, h_pre: Tensor) -> tuple[Tensor, Tensor]:
    return reference.pre_backward(grad_u, x, h_pre)


@torch.library.custom_op("hcpass::post_res", mutates_args=())
def post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    return reference.post_res(x, y, h_post, h_res)


@torch.library.custom_op("hcpass::post_res_backward", mutates_args=())
def post_res_backward(
    grad_out: Tensor, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return reference.post_res_backward(grad_out, x, y, h_post, h_res)


# ------------------------------------------------------------------------ fake kernels
def _coeff_shapes(x: Tensor) -> tuple[tuple[int, ...], int]:
    return tuple(x.shape[1:-1]), x.shape[0]


@coeffs.register_fake
def _(x, phi, alpha, bias, manifold):
    pos, n = _coeff_shapes(x)
    new = lambda *s: x.new_empty(*s, dtype=compute_dtype(x.dtype))
    return new(*pos, n), new(*pos, n), new(*pos, n, n)


@coeffs_backward.register_fake
def _(grad_pre, grad_post, grad_res, x, phi, alpha, bias, manifold):
    like = lambda t: torch.empty_like(t) if t is not None else x.new_empty(0)
    return torch.empty_like(x), like(phi), like(alpha), torch.empty_like(bias)


@pre.register_fake
def _(x, h_pre):
    return x.new_empty(x.shape[1:])


@pre_backward.register_fake
def _(grad_u, x, h_pre):
    return torch.empty_like(x), torch.empty_like(h_pre)


@post_res.register_fake
def _(x, y, h_post, h_res):
    return torch.empty_like(x)


@post_res_backward.register_fake
def _(grad_out, x, y, h_post, h_res):
    return (
        torch.empty_like(x),
        torch.empty_like(y),
        torch.empty_like(h_post),
        torch.empty_like(h_res),
    )


# ---------------------------------------------------------------------------- autograd
def _setup_coeffs(ctx, inputs, output):
    x, phi, alpha, bias, manifold = inputs
    ctx.save_for_backward(x, phi, alpha, bias)
    ctx.manifold = manifold


def _setup_saving_all(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _coeffs_backward(ctx, grad_pre, grad_post, grad_res):
    x, phi, alpha, bias = ctx.saved_tensors
    gx, gphi, galpha, gbias = torch.ops.hcpass.coeffs_backward(
        grad_pre, grad_post, grad_res, x, phi, alpha, bias, ctx.manifold
    )
    return gx, gphi if phi is not None else None, galpha if alpha is not None else None, gbias, None


def _pre_backward(ctx, grad_u):
    x, h_pre = ctx.saved_tensors
    return torch.ops.hcpass.pre_backward(grad_u, x, h_pre)


def _post_res_backward(ctx, grad_out):
    x, y, h_post, h_res = ctx.saved_tensors
    return torch.ops.hcpass.post_res_backward(grad_out, x, y, h_post, h_res)


coeffs.register_autograd(_coeffs_backward, setup_context=_setup_coeffs)
pre.register_autograd(_pre_backward, setup_context=_setup_saving_all)
post_res.register_autograd(_post_res_backward, setup_context=_setup_saving_all)

# op -> its reference, for back ends that lower the ops to plain PyTorch.
REFERENCE = {
    torch.ops.hcpass.coeffs.default: reference.coeffs,
    torch.ops.hcpass.coeffs_backward.default: reference.coeffs_backward,
    torch.ops.hcpass.pre.default: reference.pre,
    torch.ops.hcpass.pre_backward.default: reference.pre_backward,
    torch.ops.hcpass.post_res.default: reference.post_res,
    torch.ops.hcpass.post_res_backward.default: reference.post_res_backward,
}
