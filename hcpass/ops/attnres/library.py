"""The ``hcpass::attnres`` ops: schema, CPU kernel (the reference), fake kernels, autograd.

    hcpass::attnres(Tensor[] values, Tensor query, float eps) -> Tensor
    hcpass::attnres_backward(Tensor grad, Tensor[] values, Tensor query, float eps)
        -> (Tensor[] grad_values, Tensor grad_query)

`reference` has the math. Autograd saves only the inputs (values and query); the backward
op recomputes the logits and weights from them. The CUDA path registers the Triton kernels
of `hcpass.codegen.attnres` for both ops (`hcpass.codegen.register_cuda_kernels`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from hcpass.ops.attnres import reference
from hcpass.ops.library import no_second_derivative

_F = TypeVar("_F", bound=Callable)


def _without_autocast(fn: _F, query_index: int) -> _F:
    """Run a CPU kernel with autocast off: the sums accumulate in compute dtype by contract,
    but a custom op falls through the autocast dispatch key, so its kernel -- and the
    reference traced in its place on CPU -- would see autocast. The device comes from the
    query (argument `query_index`): the values are a list, maybe an empty one."""

    @functools.wraps(fn)
    def run(*args):
        with torch.autocast(args[query_index].device.type, enabled=False):
            return fn(*args)

    return run  # type: ignore[return-value]


_attnres_ref = _without_autocast(reference.attnres, 1)
_attnres_backward_ref = _without_autocast(reference.attnres_backward, 2)


@torch.library.custom_op("hcpass::attnres", mutates_args=())
def attnres(values: list[Tensor], query: Tensor, eps: float) -> Tensor:
    return _attnres_ref(values, query, eps)


@torch.library.custom_op("hcpass::attnres_backward", mutates_args=())
def attnres_backward(
    grad: Tensor, values: list[Tensor], query: Tensor, eps: float
) -> tuple[list[Tensor], Tensor]:
    return _attnres_backward_ref(grad, values, query, eps)


# ------------------------------------------------------------------------ fake kernels
# Contiguous outputs whatever the inputs' layout (expanded values too), as the reference
# and the kernels return them; the same input checks as the real kernels.
@attnres.register_fake
def _(values, query, eps):
    reference.check_inputs(values, query)
    return values[0].new_empty(values[0].shape)


@attnres_backward.register_fake
def _(grad, values, query, eps):
    reference.check_inputs(values, query)
    reference.check_grad(grad, values)
    return [v.new_empty(v.shape) for v in values], query.new_empty(query.shape)


# ---------------------------------------------------------------------------- autograd
def _setup_attnres(ctx, inputs, output):
    values, query, eps = inputs
    ctx.save_for_backward(*values, query)
    ctx.eps = eps


def _attnres_backward(ctx, grad):
    *values, query = ctx.saved_tensors
    grad_values, grad_query = torch.ops.hcpass.attnres_backward(grad, values, query, ctx.eps)
    return grad_values, grad_query, None


attnres.register_autograd(_attnres_backward, setup_context=_setup_attnres)
attnres_backward.register_autograd(no_second_derivative)

# op -> its reference, for back ends that lower the ops to plain PyTorch (merged into
# `hcpass.ops.REFERENCE`).
REFERENCE = {
    torch.ops.hcpass.attnres.default: _attnres_ref,
    torch.ops.hcpass.attnres_backward.default: _attnres_backward_ref,
}
