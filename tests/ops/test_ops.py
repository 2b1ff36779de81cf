"""The ``hcpass::`` custom ops as PyTorch sees them: `torch.library.opcheck` runs each op's
schema, fake kernel, autograd registration and AOT dispatch against its CPU kernel (the
reference). A fake kernel that promises other shapes or strides than the real kernel
returns breaks Inductor only where the op stays opaque (the CUDA path), so it is checked
here, on CPU."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import hcpass  # noqa: F401  (defines the ops)
from hcpass import native
from hcpass.ops import batched, reference, streams
from tests.op_inputs import boundary_inputs, coeffs_inputs, stream_inputs

OPS = torch.ops.hcpass


def _cases() -> dict[str, tuple]:
    pos, C = (2, 3), 8
    args: dict[str, tuple] = {}
    for n in (2, 4):
        for name, options in (("sinkhorn", {}), ("sinkhorn", {"dynamic": False}), ("hc", {})):
            key = f"n{n}-{name}{'-static' if options else ''}"
            coeff_args = coeffs_inputs(name, n, pos, C, torch.float64, options)
            grads = tuple(torch.randn_like(t) for t in reference.coeffs(*coeff_args))
            args[f"coeffs-{key}"] = (OPS.coeffs, coeff_args)
            args[f"coeffs_backward-{key}"] = (OPS.coeffs_backward, (*grads, *coeff_args))
            boundary = boundary_inputs(n, pos, C, torch.float64, options)
            if name == "sinkhorn":
                args[f"post_res_coeffs_pre-{key}"] = (OPS.post_res_coeffs_pre, boundary)
        for op in ("pre", "pre_backward", "post_res", "post_res_backward"):
            args[f"{op}-n{n}"] = (getattr(OPS, op), stream_inputs(op, n, pos, C, torch.float64))
    # a chain's first site reads the input expanded to n streams (stride 0), not a copy
    x, *rest = coeffs_inputs("sinkhorn", 4, pos, C, torch.float64, {})
    expanded = x[:1].expand(x.shape)
    args["coeffs-expanded"] = (OPS.coeffs, (expanded, *rest))
    args["pre-expanded"] = (OPS.pre, (expanded, stream_inputs("pre", 4, pos, C, torch.float64)[1]))
    grads = tuple(torch.randn_like(t) for t in reference.coeffs(expanded, *rest))
    args["coeffs_backward-expanded"] = (OPS.coeffs_backward, (*grads, expanded, *rest))
    # Sinkhorn's own op (what torch.compile sees of the sinkhorn manifold's H_res map), on
    # logits sliced from the projection as `res_map` passes them (not contiguous)
    logits = torch.randn(*pos, 2 * 4 + 16, dtype=torch.float64)[..., 8:].unflatten(-1, (4, 4))
    args["sinkhorn-n4"] = (OPS.sinkhorn, (logits, 20))
    args["sinkhorn_backward-n4"] = (OPS.sinkhorn_backward, (logits, torch.randn_like(logits), 20))
    return args


CASES = _cases()


def _requiring_grad(args: tuple) -> tuple:
    return tuple(
        a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    )


# coeffs_backward's CPU kernel differentiates with torch.func.vjp, whose wrapped tensors the
# dispatch modes of opcheck's schema, fake-tensor and AOT checks cannot read ("Cannot access
# storage of TensorWrapper"; compiled code calls the kernel outside such modes): its fake
# kernel is compared with the real one directly.
WITHOUT_MODES = ("test_autograd_registration",)


def assert_fake_kernel_matches(op, args: tuple) -> None:
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    for index, (r, f) in enumerate(zip(real, fake, strict=True)):
        got, want = (f.shape, f.stride(), f.dtype), (r.shape, r.stride(), r.dtype)
        assert got == want, f"output {index}: fake {got}, real {want}"


# Ops whose backward is an autograd.Function around them (hcpass.manifolds.sinkhorn), not a
# registration of their own: called directly they have none to check.
DIFFERENTIATED_OUTSIDE = ("sinkhorn",)


@pytest.mark.parametrize("case", sorted(CASES))
def test_opcheck(case):
    op, args = CASES[case]
    if case.startswith("coeffs_backward"):
        torch.library.opcheck(op, args, test_utils=WITHOUT_MODES)
        assert_fake_kernel_matches(op, args)
    else:
        torch.library.opcheck(op, args)
    if case.split("-")[0] not in DIFFERENTIATED_OUTSIDE and not case.split("-")[0].endswith(
        "_backward"
    ):
        torch.library.opcheck(op, _requiring_grad(args))


# ------------------------------------------------------------- eager kernels vs reference
# The stream ops' CPU kernels: `streams` (the C++ kernel the ops run) and `batched` (its
# PyTorch fallback). Per dtype: they sum the same products as the reference in another order
# (bf16 streams accumulate in fp32 and round once at the end, so they differ by at most one
# bf16 rounding).
BATCHED_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}
STREAM_OPS = ("pre", "pre_backward", "post_res", "post_res_backward")
KERNELS = {"streams": streams, "batched": batched}


def test_the_stream_kernel_is_built_on_this_machine():
    """Otherwise the `streams` cases below would test the fallback twice."""
    assert native.load(streams.KERNEL, streams.KERNEL_ARGS) is not None


def _outputs(result) -> tuple:
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


@pytest.mark.parametrize("kernels", sorted(KERNELS))
@pytest.mark.parametrize("dtype", sorted(BATCHED_TOL, key=str), ids=str)
@pytest.mark.parametrize(
    "n, pos, C",
    [(1, (3,), 5), (2, (), 4), (4, (2, 3), 8), (4, (2, 3, 4), 16), (4, (0, 3), 8), (3, (5,), 0)],
)
@pytest.mark.parametrize("op", STREAM_OPS)
def test_cpu_kernels_match_the_reference(op, n, pos, C, dtype, kernels):
    args = stream_inputs(op, n, pos, C, dtype)
    want = _outputs(getattr(reference, op)(*args))
    got = _outputs(getattr(KERNELS[kernels], op)(*args))
    for w, g in zip(want, got, strict=True):
        assert (g.shape, g.dtype) == (w.shape, w.dtype)
        assert g.is_contiguous()
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(g, w, atol=BATCHED_TOL[dtype] * scale, rtol=BATCHED_TOL[dtype])


# Stream states the kernels must read whatever their layout: a chain's first site reads its
# input expanded to n streams (stride 0, not a BLAS matrix per position), a state can be a
# view of a positions-first ``[*pos, n, C]`` tensor, and a gradient can be broadcast over
# positions (stride 0) or have its channels strided.
STATE_LAYOUTS = {
    "expanded": lambda x: x[:1].expand(x.shape),
    "positions-first": lambda x: x.movedim(0, -2).contiguous().movedim(-2, 0),
    "broadcast-positions": lambda x: x[:, :1, :1].expand(x.shape),
    "channels-strided": lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2),
}


@pytest.mark.parametrize("kernels", sorted(KERNELS))
@pytest.mark.parametrize("layout", sorted(STATE_LAYOUTS))
@pytest.mark.parametrize("op", STREAM_OPS)
def test_cpu_kernels_read_any_state_layout(op, layout, kernels):
    args = stream_inputs(op, 4, (2, 3), 8, torch.float32)
    state = args[1] if op == "pre_backward" else args[0]
    # every n-stream state argument (x, and grad_out of post_res_backward) in that layout
    args = tuple(STATE_LAYOUTS[layout](a) if a.shape == state.shape else a for a in args)
    want = _outputs(getattr(reference, op)(*args))
    got = _outputs(getattr(KERNELS[kernels], op)(*args))
    for w, g in zip(want, got, strict=True):
        assert g.is_contiguous()
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("op", STREAM_OPS)
def test_without_the_stream_kernel_the_ops_run_batched(op, monkeypatch):
    """Where streams.cpp cannot be built (`native.load` gives None), the ops run `batched`."""
    args = stream_inputs(op, 4, (2, 3), 8, torch.float32)
    monkeypatch.setattr(native, "_KERNELS", {streams.KERNEL: None})
    got = _outputs(getattr(OPS, op)(*args))
    for w, g in zip(_outputs(getattr(batched, op)(*args)), got, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_threads_do_not_change_the_stream_kernel_results():
    """Each position is one thread's: the same sums in the same order at any thread count."""
    args = stream_inputs("post_res_backward", 4, (64, 33), 24, torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(streams.post_res_backward(*args) + (streams.post_res(*args[1:]),))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        torch.testing.assert_close(one, two, rtol=0, atol=0)
