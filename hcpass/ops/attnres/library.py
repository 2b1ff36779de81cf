"""The ``hcpass::attnres`` ops: schema, CPU kernel (the reference), fake kernels, autograd.

    hcpass::attnres(Tensor[] values, Tensor query, float eps) -> Tensor
    hcpass::attnres_backward(Tensor grad, Tensor[] values, Tensor query, float eps)
        -> (Tensor[] grad_values, Tensor grad_query)

and its two phases, which the CUDA lowering batches (`BatchBlockAttention`: phase 1 once
for all the queries of a block):

    hcpass::attnres_blocks(Tensor[] blocks, Tensor queries, float eps) -> (Tensor o, Tensor lse)
    hcpass::attnres_blocks_backward(Tensor grad_o, Tensor grad_lse, Tensor[] blocks,
        Tensor queries, Tensor o, Tensor lse, float eps)
        -> (Tensor[] grad_blocks, Tensor grad_queries)
    hcpass::attnres_merge(Tensor o, Tensor lse, Tensor partial, Tensor query, float eps) -> Tensor
    hcpass::attnres_merge_backward(Tensor grad, Tensor o, Tensor lse, Tensor partial,
        Tensor query, float eps) -> (Tensor grad_o, Tensor grad_lse, Tensor grad_partial,
        Tensor grad_query)

`reference` has the math. ``attnres`` and ``attnres_merge`` save only their inputs; the
backward ops recompute the logits and weights from them. ``attnres_blocks`` saves its
outputs o and lse too, so its backward never recomputes the weighted sum. The CUDA path
registers the Triton kernels of `hcpass.codegen.attnres` for every op
(`hcpass.codegen.register_cuda_kernels`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from hcpass.manifolds.base import compute_dtype
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
_blocks_ref = _without_autocast(reference.attnres_blocks, 1)
_blocks_backward_ref = _without_autocast(reference.attnres_blocks_backward, 3)
_merge_ref = _without_autocast(reference.attnres_merge, 3)
_merge_backward_ref = _without_autocast(reference.attnres_merge_backward, 4)


@torch.library.custom_op("hcpass::attnres", mutates_args=())
def attnres(values: list[Tensor], query: Tensor, eps: float) -> Tensor:
    return _attnres_ref(values, query, eps)


@torch.library.custom_op("hcpass::attnres_backward", mutates_args=())
def attnres_backward(
    grad: Tensor, values: list[Tensor], query: Tensor, eps: float
) -> tuple[list[Tensor], Tensor]:
    return _attnres_backward_ref(grad, values, query, eps)


@torch.library.custom_op("hcpass::attnres_blocks", mutates_args=())
def attnres_blocks(blocks: list[Tensor], queries: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _blocks_ref(blocks, queries, eps)


@torch.library.custom_op("hcpass::attnres_blocks_backward", mutates_args=())
def attnres_blocks_backward(
    grad_o: Tensor,
    grad_lse: Tensor,
    blocks: list[Tensor],
    queries: Tensor,
    o: Tensor,
    lse: Tensor,
    eps: float,
) -> tuple[list[Tensor], Tensor]:
    return _blocks_backward_ref(grad_o, grad_lse, blocks, queries, o, lse, eps)


@torch.library.custom_op("hcpass::attnres_merge", mutates_args=())
def attnres_merge(o: Tensor, lse: Tensor, partial: Tensor, query: Tensor, eps: float) -> Tensor:
    return _merge_ref(o, lse, partial, query, eps)


@torch.library.custom_op("hcpass::attnres_merge_backward", mutates_args=())
def attnres_merge_backward(
    grad: Tensor, o: Tensor, lse: Tensor, partial: Tensor, query: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _merge_backward_ref(grad, o, lse, partial, query, eps)


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


@attnres_blocks.register_fake
def _(blocks, queries, eps):
    reference.check_blocks(blocks, queries)
    first = blocks[0]
    acc = compute_dtype(first.dtype)
    shape = (queries.shape[0], *first.shape)
    return first.new_empty(shape, dtype=acc), first.new_empty(shape[:-1], dtype=acc)


@attnres_blocks_backward.register_fake
def _(grad_o, grad_lse, blocks, queries, o, lse, eps):
    reference.check_blocks_backward(grad_o, grad_lse, blocks, queries, o, lse)
    return [b.new_empty(b.shape) for b in blocks], queries.new_empty(queries.shape)


@attnres_merge.register_fake
def _(o, lse, partial, query, eps):
    reference.check_merge(o, lse, partial, query)
    return partial.new_empty(partial.shape)


@attnres_merge_backward.register_fake
def _(grad, o, lse, partial, query, eps):
    reference.check_merge_backward(grad, o, lse, partial, query)
    return tuple(t.new_empty(t.shape) for t in (o, lse, partial, query))


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


def _setup_blocks(ctx, inputs, output):
    blocks, queries, eps = inputs
    ctx.save_for_backward(*blocks, queries, *output)
    ctx.eps = eps


def _blocks_backward(ctx, grad_o, grad_lse):
    *blocks, queries, o, lse = ctx.saved_tensors
    grad_blocks, grad_queries = torch.ops.hcpass.attnres_blocks_backward(
        grad_o, grad_lse, blocks, queries, o, lse, ctx.eps
    )
    return grad_blocks, grad_queries, None


attnres_blocks.register_autograd(_blocks_backward, setup_context=_setup_blocks)


def _setup_merge(ctx, inputs, output):
    *tensors, eps = inputs
    ctx.save_for_backward(*tensors)
    ctx.eps = eps


def _merge_backward(ctx, grad):
    grads = torch.ops.hcpass.attnres_merge_backward(grad, *ctx.saved_tensors, ctx.eps)
    return (*grads, None)


attnres_merge.register_autograd(_merge_backward, setup_context=_setup_merge)
for _backward_op in (attnres_backward, attnres_blocks_backward, attnres_merge_backward):
    _backward_op.register_autograd(no_second_derivative)

# op -> its reference, for back ends that lower the ops to plain PyTorch (merged into
# `hcpass.ops.REFERENCE`).
REFERENCE = {
    torch.ops.hcpass.attnres.default: _attnres_ref,
    torch.ops.hcpass.attnres_backward.default: _attnres_backward_ref,
    torch.ops.hcpass.attnres_blocks.default: _blocks_ref,
    torch.ops.hcpass.attnres_blocks_backward.default: _blocks_backward_ref,
    torch.ops.hcpass.attnres_merge.default: _merge_ref,
    torch.ops.hcpass.attnres_merge_backward.default: _merge_backward_ref,
}
