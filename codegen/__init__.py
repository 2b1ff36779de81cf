"""Generated Triton kernels for the ``hcpass::`` mixer ops (installed as ``hcpass.codegen``).

- `coeffs_template.py`, `streams_template.py`: the kernels, as templates (see their docs);
- `jit_helpers.py`: the ``@triton.jit`` helpers both templates use (the residual merge),
  spliced into each;
- `generate.py`: builds a kernel module per (template, manifold epilogue), caches and
  autotunes the kernels;
- `kernels.py`: launchers with exactly the signatures of `hcpass.ops.reference`;
- `attnres.py`: the Attention Residuals kernels (its two phases) and their launchers, with
  the signatures of `hcpass.ops.attnres.reference`.

`register_cuda_kernels()` makes the launchers (`LAUNCHERS`) the CUDA implementation of the
ops, so eager CUDA calls and Inductor's output code (which calls the ops as extern kernels)
run the generated kernels; ``import hcpass`` calls it wherever triton is installed.
docs/kernels.md has the fusion plan and how to test and benchmark.
"""

from __future__ import annotations

import functools

import torch

from . import attnres, kernels
from .kernels import (
    coeffs,
    coeffs_backward,
    post_res,
    post_res_backward,
    post_res_coeffs_pre,
    pre,
    pre_backward,
)

# op name -> launcher, every ``hcpass::`` op that has a generated kernel
LAUNCHERS = {**kernels.LAUNCHERS, **attnres.LAUNCHERS}


@functools.cache
def register_cuda_kernels() -> None:
    """Register the generated kernels as the ``cuda`` kernels of the ``hcpass::`` ops.
    Idempotent (cached); CPU calls keep the reference implementation."""
    import hcpass.ops  # noqa: F401  (defines the ops)

    for name, launcher in LAUNCHERS.items():
        torch.library.register_kernel(f"hcpass::{name}", "cuda", launcher)


__all__ = [
    "LAUNCHERS",
    "attnres",
    "coeffs",
    "coeffs_backward",
    "post_res",
    "post_res_backward",
    "post_res_coeffs_pre",
    "pre",
    "pre_backward",
    "register_cuda_kernels",
]
