"""Constant tensors of the manifold maps: skew bases, permutation matrices, Helmert bases.
Not a manifold: nothing here is registered.

A map reads its constants on every call, so eagerly each is built once per (builder,
arguments, device, dtype) and cached. While the map is being traced -- Dynamo, AOTAutograd's
fake-tensor trace (the CPU lowering of ``backend="hcpass"`` inlines the maps), torch.export,
make_fx, any other dispatch mode -- it is built afresh, by torch ops on the traced input's
device and dtype, so the trace records how to compute it:

- a cached real tensor read inside a fake-tensor trace fails there ("Please convert all
  Tensors to FakeTensors first");
- one built during a trace and then cached would be a fake tensor in the next eager call;
- one made by ``torch.tensor(data)`` becomes a tensor constant of the graph, which torch
  2.13's Inductor does not pass into a shared ``invoke_subgraph`` body (the compiled call
  fails with "_torchinductor_pyobject_tensor_data_ptr: non-tensor input").

So the builders take Python ints and use only factory and elementwise ops (``arange``,
comparisons, ``cumsum``): no tensor constant anywhere, which Inductor fuses into the kernels
that read them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

Builder = Callable[..., Tensor]


def constant(build: Builder, *args: Hashable, like: Tensor) -> Tensor:
    """``build(*args, device=like.device, dtype=like.dtype)``: cached eagerly, built afresh
    while traced (see the module docstring). `build` must not mutate `like` or read its data."""
    if _tracing(like):
        return build(*args, device=like.device, dtype=like.dtype)
    return _cached(build, args, like.device, like.dtype)


def _tracing(like: Tensor) -> bool:
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or is_fake(like)


@functools.cache
def _cached(build: Builder, args: tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
    # a normal tensor even when first asked for under inference_mode: later calls may save
    # it for backward
    with torch.inference_mode(False), torch.no_grad():
        return build(*args, device=device, dtype=dtype)
