"""The ``hcpass::`` custom ops: one schema, a CPU kernel, fake kernels, autograd.

The CPU kernels are the references (`reference`), except the stream ops (``pre``,
``post_res`` and their backward), which run `streams` (a C++ kernel, one pass over the
positions; `batched` where it cannot be built): eagerly, the references' broadcast products
would be materialised at n^2 times the state.

Forward and backward are separate ops so a back end can replace each (the CUDA path
registers generated Triton kernels for all of them); autograd wires them together.
`post_res_coeffs_pre` fuses the boundary between two sites (the CUDA lowering's
`FuseAcrossSites` pass puts it in); its backward is the three ops' backward ops in sequence.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from hcpass.manifolds.base import compute_dtype
from hcpass.ops import reference, streams

_F = TypeVar("_F", bound=Callable[..., tuple[Tensor, ...]])


def without_autocast(fn: _F) -> _F:
    """Run an op's kernel with autocast off: the coefficients are fp32 and the stream sums
    accumulate in fp32 by contract (docs/math.md), but a custom op falls through the
    autocast dispatch key, so its kernel -- the reference traced in its place on CPU, the
    PyTorch parts of a CUDA launcher -- would run its matmuls in bf16. The device is the
    first tensor argument's (or the first tensor of a leading list: the attnres ops')."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = _device_type(args)
        # Entering the context costs as much as a small op: at decode time (one position)
        # each site's ops would pay it three times over for nothing.
        if not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def _device_type(args: tuple) -> str:
    for arg in args:
        if isinstance(arg, (list, tuple)) and arg:
            arg = arg[0]
        if isinstance(arg, Tensor):
            return arg.device.type
    raise ValueError("an hcpass op was called without a tensor argument")


_coeffs_ref = without_autocast(reference.coeffs)
_coeffs_backward_ref = without_autocast(reference.coeffs_backward)
_post_res_coeffs_pre_ref = without_autocast(reference.post_res_coeffs_pre)
# The batched fallback's matmuls would be autocast to bf16 too (the references' broadcast
# products are not on autocast's list); they accumulate in fp32 by contract.
_pre_cpu = without_autocast(streams.pre)
_pre_backward_cpu = without_autocast(streams.pre_backward)
_post_res_cpu = without_autocast(streams.post_res)
_post_res_backward_cpu = without_autocast(streams.post_res_backward)


@torch.library.custom_op("hcpass::coeffs", mutates_args=())
def coeffs(
    x: Tensor, phi: Tensor | None, alpha: Tensor | None, bias: Tensor, manifold: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _coeffs_ref(x, phi, alpha, bias, manifold)


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
    return _coeffs_backward_ref(grad_pre, grad_post, grad_res, x, phi, alpha, bias, manifold)


@torch.library.custom_op("hcpass::pre", mutates_args=())
def pre(x: Tensor, h_pre: Tensor) -> Tensor:
    return _pre_cpu(x, h_pre)


@torch.library.custom_op("hcpass::pre_backward", mutates_args=())
def pre_backward(grad_u: Tensor, x: Tensor, h_pre: Tensor) -> tuple[Tensor, Tensor]:
    return _pre_backward_cpu(grad_u, x, h_pre)


@torch.library.custom_op("hcpass::post_res", mutates_args=())
def post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    return _post_res_cpu(x, y, h_post, h_res)


@torch.library.custom_op("hcpass::post_res_backward", mutates_args=())
def post_res_backward(
    grad_out: Tensor, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _post_res_backward_cpu(grad_out, x, y, h_post, h_res)


@torch.library.custom_op("hcpass::post_res_coeffs_pre", mutates_args=())
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
    return _post_res_coeffs_pre_ref(x, y, h_post, h_res, phi, alpha, bias, manifold)


# ------------------------------------------------------------------------ fake kernels
# Every output is contiguous whatever the inputs' layout, as the reference and the kernels
# return it (tests/ops/test_ops.py checks the two agree).
def _coeff_shapes(x: Tensor) -> tuple[tuple[int, ...], int]:
    return tuple(x.shape[1:-1]), x.shape[0]


def _like(t: Tensor) -> Tensor:
    return t.new_empty(t.shape)


def _coefficients_like(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """H_pre, H_post, H_res of the stream state `x`."""
    pos, n = _coeff_shapes(x)
    new = lambda *s: x.new_empty(*s, dtype=compute_dtype(x.dtype))
    return new(*pos, n), new(*pos, n), new(*pos, n, n)


def _branch_input_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1:])


@coeffs.register_fake
def _(x, phi, alpha, bias, manifold):
    return _coefficients_like(x)


@coeffs_backward.register_fake
def _(grad_pre, grad_post, grad_res, x, phi, alpha, bias, manifold):
    maybe = lambda t: _like(t) if t is not None else x.new_empty(0)
    return _like(x), maybe(phi), maybe(alpha), _like(bias)


@pre.register_fake
def _(x, h_pre):
    return _branch_input_like(x)


@pre_backward.register_fake
def _(grad_u, x, h_pre):
    return _like(x), _like(h_pre)


@post_res.register_fake
def _(x, y, h_post, h_res):
    return _like(x)


@post_res_backward.register_fake
def _(grad_out, x, y, h_post, h_res):
    return (
        _like(x),
        _like(y),
        _like(h_post),
        _like(h_res),
    )


@post_res_coeffs_pre.register_fake
def _(x, y, h_post, h_res, phi, alpha, bias, manifold):
    return _like(x), *_coefficients_like(x), _branch_input_like(x)


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


def _setup_post_res_coeffs_pre(ctx, inputs, output):
    x, y, h_post, h_res, phi, alpha, bias, manifold = inputs
    out, h_pre_next = output[0], output[1]
    ctx.save_for_backward(x, y, h_post, h_res, phi, alpha, bias, out, h_pre_next)
    ctx.manifold = manifold


def _post_res_coeffs_pre_backward(ctx, grad_out, grad_pre, grad_post, grad_res, grad_u):
    x, y, h_post, h_res, phi, alpha, bias, out, h_pre_next = ctx.saved_tensors
    ops = torch.ops.hcpass
    # back through pre, coeffs, post_res: X' feeds all three paths, H_pre' two
    gx_pre, gh_pre = ops.pre_backward(grad_u, out, h_pre_next)
    gx_coeffs, gphi, galpha, gbias = ops.coeffs_backward(
        grad_pre + gh_pre, grad_post, grad_res, out, phi, alpha, bias, ctx.manifold
    )
    gx, gy, gh_post, gh_res = ops.post_res_backward(
        grad_out + gx_pre + gx_coeffs, x, y, h_post, h_res
    )
    return (
        gx,
        gy,
        gh_post,
        gh_res,
        gphi if phi is not None else None,
        galpha if alpha is not None else None,
        gbias,
        None,
    )


def no_second_derivative(ctx, *grads):
    """The autograd formula of every backward op: a backward with ``create_graph=True`` works
    (and is differentiable through the rest of the model); differentiating it again through
    the mixers stops here, with what happened, rather than with torch's "no autograd formula
    was registered" naming an internal op."""
    raise RuntimeError(
        "hcpass: a second derivative through a converted model's mixers (a gradient penalty, "
        "a Hessian-vector product: differentiating a gradient taken with create_graph=True) "
        "is not supported; the mixer ops have first-order gradients only"
    )


for _backward_op in (coeffs_backward, pre_backward, post_res_backward):
    _backward_op.register_autograd(no_second_derivative)
coeffs.register_autograd(_coeffs_backward, setup_context=_setup_coeffs)
pre.register_autograd(_pre_backward, setup_context=_setup_saving_all)
post_res.register_autograd(_post_res_backward, setup_context=_setup_saving_all)
post_res_coeffs_pre.register_autograd(
    _post_res_coeffs_pre_backward, setup_context=_setup_post_res_coeffs_pre
)

# op -> its reference, for back ends that lower the ops to plain PyTorch.
REFERENCE = {
    torch.ops.hcpass.coeffs.default: _coeffs_ref,
    torch.ops.hcpass.coeffs_backward.default: _coeffs_backward_ref,
    torch.ops.hcpass.pre.default: reference.pre,
    torch.ops.hcpass.pre_backward.default: reference.pre_backward,
    torch.ops.hcpass.post_res.default: reference.post_res,
    torch.ops.hcpass.post_res_backward.default: reference.post_res_backward,
    torch.ops.hcpass.post_res_coeffs_pre.default: _post_res_coeffs_pre_ref,
}
