"""sinkhorn.cpp, the CPU kernel behind ``hcpass::sinkhorn`` and ``hcpass::sinkhorn_backward``,
against the PyTorch reference (`sinkhorn`, `sinkhorn_vjp`).

Tolerances: the kernel runs the reference's steps in the same order but divides by a sum as
a multiplication by its reciprocal (within an ulp per step), and its exp is libm's, not
ATen's; over 2 * iters steps that stays within 1e-5 relative in fp32 and 1e-12 in fp64.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import torch
from torch import Tensor

from hcpass import native
from hcpass.manifolds.sinkhorn import _CPU_KERNEL, _CPU_KERNEL_ARGS, sinkhorn, sinkhorn_vjp
from tests.op_inputs import saturated_sinkhorn_inputs, sinkhorn_fp64_reference

TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
}
ops = torch.ops.hcpass


def logits_and_grad(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 3.0):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return logits, grad


def assert_matches_reference(logits: Tensor, grad: Tensor, iters: int) -> None:
    out, dlogits = ops.sinkhorn(logits, iters), ops.sinkhorn_backward(logits, grad, iters)
    tol = TOL[out.dtype]
    torch.testing.assert_close(out, sinkhorn(logits, iters).contiguous(), **tol)
    torch.testing.assert_close(dlogits, sinkhorn_vjp(logits, grad, iters).contiguous(), **tol)


def test_the_kernel_is_built_on_this_machine() -> None:
    """Otherwise every comparison below would compare the reference with itself."""
    assert native.load(_CPU_KERNEL, _CPU_KERNEL_ARGS) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("iters", [1, 7, 20])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_matches_the_reference(n: int, iters: int, dtype: torch.dtype) -> None:
    # 185 positions: two full blocks of 64 and a partial one
    assert_matches_reference(*logits_and_grad((5, 37, n, n), dtype), iters)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clamped_and_underflowed_sums_match_the_reference(dtype: torch.dtype) -> None:
    """A column 80 below the rest sums to ~1e-34 < eps at the first step: the clamp is
    active and its share of the gradient dropped. One 1e4 below underflows to 0: its
    forward is a zero column, its gradient 0 (exp is flat there), the rest finite."""
    logits, grad = logits_and_grad((48, 4, 4), dtype, scale=1.0)
    logits[::2, :, 0] -= 80.0
    assert_matches_reference(logits, grad, 20)
    logits[1::2, :, 1] -= 1e4
    out, dlogits = ops.sinkhorn(logits, 20), ops.sinkhorn_backward(logits, grad, 20)
    assert (out[1::2, :, 1] == 0).all() and (dlogits[1::2, :, 1] == 0).all()
    assert dlogits.isfinite().all()
    assert_matches_reference(logits, grad, 20)


@pytest.mark.parametrize("n", range(2, 9))
def test_saturated_logits_match_fp64(n: int) -> None:
    """Logits spanning +-100 (exact zeros after exp, sums below eps at the first steps): the
    kernel's backward matches fp64 autograd of the unrolled forward within 1e-5 (its
    gradients are below 1). Stepping back by dividing by the sums overflowed fp32 here."""
    logits, grad = saturated_sinkhorn_inputs(n, 185, seed=n)  # blocks of 64 and a partial one
    h, want = sinkhorn_fp64_reference(logits, grad, 20)
    torch.testing.assert_close(ops.sinkhorn(logits, 20).double(), h, rtol=0, atol=1e-5)
    got = ops.sinkhorn_backward(logits, grad, 20)
    assert got.isfinite().all()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_nan_stays_in_its_position() -> None:
    logits, grad = logits_and_grad((70, 4, 4), torch.float32)
    logits[66, 1, 2] = float("nan")
    out, dlogits = ops.sinkhorn(logits, 20), ops.sinkhorn_backward(logits, grad, 20)
    assert out[66].isnan().all() and dlogits[66].isnan().all()
    rest = torch.arange(70) != 66
    assert out[rest].isfinite().all() and dlogits[rest].isfinite().all()
    torch.testing.assert_close(out[rest], sinkhorn(logits[rest], 20), **TOL[torch.float32])


def test_low_precision_logits_compute_in_fp32() -> None:
    logits, grad = logits_and_grad((3, 50, 4, 4), torch.bfloat16)
    out, dlogits = ops.sinkhorn(logits, 20), ops.sinkhorn_backward(logits, grad, 20)
    assert out.dtype == dlogits.dtype == torch.float32
    assert_matches_reference(logits, grad, 20)


def test_any_layout_and_no_positions() -> None:
    logits, grad = logits_and_grad((4, 4, 90), torch.float32)
    assert_matches_reference(logits.movedim(-1, 0), grad.movedim(-1, 0), 20)  # strided
    assert_matches_reference(
        logits[:, :, :1].movedim(-1, 0).expand(9, 4, 4), grad.movedim(-1, 0)[:9].mT, 5
    )
    empty = torch.empty(0, 3, 4, 4)
    assert ops.sinkhorn(empty, 20).shape == ops.sinkhorn_backward(empty, empty, 20).shape


def test_threads_do_not_change_the_result() -> None:
    logits, grad = logits_and_grad((1000, 4, 4), torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append((ops.sinkhorn(logits, 20), ops.sinkhorn_backward(logits, grad, 20)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        torch.testing.assert_close(one, two, rtol=0, atol=0)


def test_without_the_kernel_the_ops_run_the_reference(monkeypatch, caplog) -> None:
    """A build failure (no compiler, say) is logged once and the ops fall back."""
    from torch._inductor.codecache import CppCodeCache

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Failed to find a C++ compiler")

    monkeypatch.setattr(native, "_KERNELS", {})
    monkeypatch.setattr(CppCodeCache, "load", no_compiler)
    logits, grad = logits_and_grad((10, 4, 4), torch.float32)
    with caplog.at_level(logging.WARNING, logger="hcpass"):
        out, dlogits = ops.sinkhorn(logits, 20), ops.sinkhorn_backward(logits, grad, 20)
    assert [r.getMessage() for r in caplog.records] == [
        "hcpass: could not build the C++ kernel manifolds/sinkhorn.cpp (RuntimeError: Failed to "
        "find a C++ compiler); its ops run in PyTorch on CPU instead, correct but slower"
    ]
    torch.testing.assert_close(out, sinkhorn(logits, 20).contiguous(), rtol=0, atol=0)
    reference = sinkhorn_vjp(logits, grad, 20).contiguous()
    torch.testing.assert_close(dlogits, reference, rtol=0, atol=0)


def test_a_cpu_trace_builds_the_kernel_in_the_background(monkeypatch) -> None:
    """The fake kernels start the build, so the compiler runs while the trace goes on."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    builders = []

    def build(name, argtypes):
        builders.append(threading.current_thread().name)
        return print

    monkeypatch.setattr(native, "_KERNELS", {})
    monkeypatch.setattr(native, "_PREFETCHING", set())
    monkeypatch.setattr(native, "_build", build)
    with FakeTensorMode():
        ops.sinkhorn_backward(torch.empty(8, 4, 4), torch.empty(8, 4, 4), 20)
        ops.sinkhorn(torch.empty(8, 4, 4), 20)
    deadline = time.monotonic() + 60
    while _CPU_KERNEL not in native._KERNELS and time.monotonic() < deadline:
        time.sleep(0.01)
    assert native.load(_CPU_KERNEL, _CPU_KERNEL_ARGS) is print
    assert builders == ["hcpass-build-manifolds/sinkhorn.cpp"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_inherit_a_held_build_lock(monkeypatch) -> None:
    """Forked while another thread builds a kernel (holding the lock), a child that calls
    the op must not wait for a build that does not exist in it."""
    monkeypatch.setattr(native, "_KERNELS", {})
    monkeypatch.setattr(native, "_build", lambda name, argtypes: print)
    with native._LOCK:
        pid = os.fork()
        if pid == 0:  # the child: an alarm turns a deadlock into a failure
            signal.alarm(20)
            os._exit(0 if native.load(_CPU_KERNEL, _CPU_KERNEL_ARGS) is print else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
