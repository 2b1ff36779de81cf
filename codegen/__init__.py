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
from collections.abc import Callable, Mapping

import torch

from hcpass.ops.library import without_autocast

from . import attnres, generate, kernels
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
    _register("cuda", LAUNCHERS)


def _register(device_type: str, launchers: Mapping[str, Callable]) -> None:
    """`launchers` as their ops' kernels for `device_type`, with autocast off inside: the
    launchers' PyTorch parts (HC's coefficients, the H_res maps without a Triton epilogue)
    compute in fp32 under autocast too, as the ops' CPU kernels do."""
    for name, launcher in launchers.items():
        torch.library.register_kernel(f"hcpass::{name}", device_type, without_autocast(launcher))


def register_interpreted_cpu_kernels(launchers: Mapping[str, Callable] = LAUNCHERS) -> None:
    """Register `launchers` as the ``cpu`` kernels of their ops too, so CPU tensors take the
    CUDA path, every kernel run by Triton's interpreter: the CUDA-path tests and
    ``benchmarks/gpu_session.sh --dry-run``. Only in a process that imported triton with
    TRITON_INTERPRET=1. An op's own CPU kernel stays reachable through its
    ``set_kernel_enabled("cpu", False)``."""
    if not generate.interpreted():
        raise RuntimeError(
            "register_interpreted_cpu_kernels: triton was imported without TRITON_INTERPRET=1, "
            "so the kernels cannot run on CPU tensors; set it before anything imports triton"
        )
    _register("cpu", launchers)


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
    "register_interpreted_cpu_kernels",
]
