"""Triton's interpreter as the tests run it: a worker process (conftest's `interpreter`)
whose triton was imported with TRITON_INTERPRET=1, converting fp32 to bf16 as a GPU does.

Why the patch. Triton 3.9's interpreter converts fp32 to bf16 by truncation: every
``.to(tl.bfloat16)`` and every store of an fp32 value through a bf16 pointer reaches
`InterpreterBuilder.cast_impl`, which calls ``_convert_float(..., rounding_mode=None)``
(``fp_downcast_rounding="rtne"`` takes the same path: `semantic.cast` lowers a default
rounding downcast to ``create_fp_trunc``). A GPU (``cvt.rn.bf16.f32``) and torch round to
nearest even. Truncation is biased toward zero (about -2^-9 relative on average) and its
worst error is twice the rounding's, so an interpreted bf16 kernel looked worse than it is:
the Attention Residuals kernels were bitwise the reference with rounding to nearest and
off by up to 2 bf16 ulps with truncation, and a bf16 Block AttnRes model's gradients
drifted from the fp32 run past the CUDA-path bound (tests/lowering/test_cuda_path.py).

`round_bf16_to_nearest_even` replaces the fp32 -> bf16 case of ``cast_impl`` with the
rounding torch uses (``c10::round_to_nearest_even``: ties to even, overflow to inf, NaN
to the quiet NaN 0x7FC0), then checks a kernel's explicit and implicit (store) casts against
torch, bit for bit, on ties, halfway-plus values, subnormals, overflow, infinities and NaN. The
internals it patches are looked up by name: if a triton release renames them, the worker
fails to start, naming what is missing (never runs with truncation unnoticed); if the
interpreter already rounds to nearest, nothing is patched and the check still runs.
"""

from __future__ import annotations

import numpy as np
import torch


def fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """The bf16 bit patterns (uint16) of fp32 `values`, rounded to nearest even."""
    values = np.asarray(values, dtype=np.float32)
    bits = values.reshape(-1).view(np.uint32)
    odd = (bits >> 16) & np.uint32(1)
    rounded = ((bits + np.uint32(0x7FFF) + odd) >> 16).astype(np.uint16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, np.uint16(0x7FC0), rounded).reshape(values.shape)


def round_bf16_to_nearest_even() -> None:
    """Make this process's Triton interpreter round fp32 -> bf16 to nearest even (module
    docstring); raises if triton's interpreter internals are not where triton 3.9 has them,
    or if the casts still disagree with torch afterwards."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    truncating = getattr(builder, "cast_impl", None)
    if builder is None or handle is None or truncating is None:
        raise RuntimeError(
            "tests/interpreter.py: triton.runtime.interpreter has no InterpreterBuilder."
            "cast_impl or TensorHandle (written against triton 3.9); find where this triton "
            "converts fp32 to bf16 in the interpreter and patch that to round to nearest even"
        )
    if not converts_to_bf16_as_torch(torch.tensor(PROBES)):

        def cast_impl(self, src, dst_type):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                return handle(fp32_to_bf16_bits(src.data), dst_type.scalar)
            return truncating(self, src, dst_type)

        builder.cast_impl = cast_impl
    if not converts_to_bf16_as_torch(torch.tensor(PROBES)):
        raise RuntimeError(
            "tests/interpreter.py: after patching InterpreterBuilder.cast_impl, the Triton "
            "interpreter still does not convert fp32 to bf16 as torch does; this triton "
            "converts elsewhere: patch that"
        )


# fp32 values whose bf16 roundings tell truncation from rounding to nearest even: exact
# values, ties to even (down and up), just above a tie, either side of the overflow to inf,
# infinities, NaN, subnormals, negatives.
PROBES = [
    0.0,
    -0.0,
    1.0,
    1.0 + 2**-8,  # tie between 1 and 1 + 2^-7: to 1 (even)
    1.0 + 3 * 2**-8,  # tie: to 1 + 2^-6 (even)
    1.0 + 2**-8 + 2**-20,  # just above the tie: up
    -(1.0 + 2**-8 + 2**-20),
    0.1,
    -0.3,
    3.39e38,  # below the tie between the largest finite bf16 and 2^128: finite
    3.4e38,  # above it: inf
    float("inf"),
    float("-inf"),
    float("nan"),
    1.0e-39,  # fp32 subnormal
    -3.3e-39,
]


def converts_to_bf16_as_torch(values: torch.Tensor) -> bool:
    """Whether a kernel run here converts fp32 `values` (1-d) to bf16 as torch does, bit for
    bit (a NaN to a NaN), both by ``.to(tl.bfloat16)`` and by storing through a bf16
    pointer."""
    import triton
    import triton.language as tl

    @triton.jit
    def convert(x_ptr, explicit_ptr, implicit_ptr, N, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < N)
        tl.store(explicit_ptr + i, x.to(tl.bfloat16), mask=i < N)
        tl.store(implicit_ptr + i, x, mask=i < N)

    x = values.to(torch.float32).contiguous()
    explicit, implicit = (torch.empty(x.shape, dtype=torch.bfloat16) for _ in range(2))
    convert[(1,)](x, explicit, implicit, len(x), BLOCK=triton.next_power_of_2(len(x)))
    # NaN's bits differ between torch's own conversions (0x7FC0, 0xFFFF): any NaN will do
    bits = [torch.where(t.isnan(), 0x7FC0, t.view(torch.int16)) for t in (explicit, implicit)]
    want = x.to(torch.bfloat16)
    return all(
        torch.equal(b, torch.where(want.isnan(), 0x7FC0, want.view(torch.int16))) for b in bits
    )
