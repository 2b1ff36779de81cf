"""`hcpass.ops.decode`: a site's mixer work at a few positions in one native call computes
what the ops compute (`hcpass.ops.reference`), and hands over to the ops wherever it does not
apply -- gradients, a dispatch mode watching the ops, autocast, many positions, a manifold
the kernel does not know, no kernel.

Tolerances: the kernels sum in the ops' CPU kernels' order except the projection and the
mean squares (ATen's matmul and mean there): rounding, 1e-5 relative in fp32, 1e-12 in fp64.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hcpass  # noqa: F401  (defines the ops)
from hcpass import native
from hcpass.ops import decode, reference
from hcpass.ops.attnres import reference as attnres_reference
from tests.op_inputs import boundary_inputs, coeffs_inputs, stream_inputs

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# (manifold, options): Sinkhorn's H_res in the kernel, dynamic and static; another manifold
# with the shared projection, whose H_res map runs on the logits the kernel returns.
NATIVE = [("sinkhorn", {}), ("sinkhorn", {"dynamic": False}), ("permutation", {})]
SHAPES = [(1, (), 8), (2, (1,), 16), (4, (1, 1), 128), (4, (3, 2), 32), (3, (5,), 1)]


def assert_close(got, want, dtype) -> None:
    for g, w in zip(got, want, strict=True):
        assert (g.shape, g.dtype) == (w.shape, w.dtype)
        assert g.is_contiguous()
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(g, w, atol=TOL[dtype] * scale, rtol=TOL[dtype])


def _read(x, phi, alpha, bias, spec):
    h_pre, h_post, h_res = reference.coeffs(x, phi, alpha, bias, spec)
    return h_pre, h_post, h_res, reference.pre(x, h_pre)


@pytest.fixture
def kernel_calls(monkeypatch) -> list[str]:
    """Names of the native kernels called (the ops' own kernels not included)."""
    calls: list[str] = []
    for name, args in (
        (decode.KERNEL, decode.KERNEL_ARGS),
        (decode.ATTNRES_KERNEL, decode.ATTNRES_KERNEL_ARGS),
    ):
        kernel = native.load(name, args)
        assert kernel is not None, f"{name} is not built on this machine"
        monkeypatch.setitem(
            native._KERNELS, name, lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a)
        )
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n, pos, C", SHAPES)
@pytest.mark.parametrize("manifold, options", NATIVE, ids=lambda v: str(v))
def test_one_call_computes_what_the_ops_compute(manifold, options, n, pos, C, dtype, kernel_calls):
    with torch.no_grad():
        args = coeffs_inputs(manifold, n, pos, C, dtype, options)
        assert_close(decode.site_read(*args), _read(*args), dtype)
        boundary = boundary_inputs(n, pos, C, dtype, options, manifold)
        assert_close(decode.merge_read(*boundary), reference.post_res_coeffs_pre(*boundary), dtype)
        merge = stream_inputs("post_res", n, pos, C, dtype)
        assert_close([decode.merge(*merge)], [reference.post_res(*merge)], dtype)
    assert kernel_calls == [decode.KERNEL] * 3


def test_a_chains_first_site_reads_its_input_expanded_to_n_streams(kernel_calls):
    x, *params = coeffs_inputs("sinkhorn", 4, (1, 1), 64, torch.float32, {})
    expanded = x[:1].expand(x.shape)  # stream stride 0
    with torch.no_grad():
        assert_close(decode.site_read(expanded, *params), _read(expanded, *params), torch.float32)
    assert kernel_calls == [decode.KERNEL]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "k, pos, C", [(2, (1, 1), 128), (9, (1, 1), 128), (5, (3, 2), 16), (3, (), 1)]
)
def test_attnres_in_one_call_computes_what_the_op_computes(k, pos, C, dtype, kernel_calls):
    values = [torch.randn(*pos, C, dtype=dtype) for _ in range(k)]
    values[1] = torch.randn(*pos, 2 * C, dtype=dtype)[..., ::2]  # channels strided: copied
    query = torch.randn(C, dtype=dtype)
    with torch.no_grad():
        got = decode.attnres(values, query, 1e-6)
    assert_close([got], [attnres_reference.attnres(values, query, 1e-6)], dtype)
    assert kernel_calls == [decode.ATTNRES_KERNEL]


class _OpsSeen(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace == "hcpass" and name in EVERY_OP:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _all_calls(args, boundary, merge, values, query):
    return (
        decode.site_read(*args),
        decode.merge_read(*boundary),
        decode.merge(*merge),
        decode.attnres(values, query, 1e-6),
    )


def _inputs(dtype=torch.float32, pos=(1, 1)):
    args = coeffs_inputs("sinkhorn", 4, pos, 16, dtype, {})
    boundary = boundary_inputs(4, pos, 16, dtype, {})
    merge = stream_inputs("post_res", 4, pos, 16, dtype)
    values = [torch.randn(*pos, 16, dtype=dtype) for _ in range(3)]
    return args, boundary, merge, values, torch.randn(16, dtype=dtype)


EVERY_OP = ["coeffs", "pre", "post_res", "coeffs", "pre", "post_res", "attnres"]


def test_a_dispatch_mode_sees_the_ops_in_their_order(kernel_calls):
    """hcpass.mixers and the inspection tools watch the ops through a dispatch mode."""
    with torch.no_grad(), _OpsSeen() as seen:
        _all_calls(*_inputs())
    assert seen.ops == EVERY_OP
    assert kernel_calls == []


def _ops_calls(args, boundary, merge, values, query):
    ops = torch.ops.hcpass
    h = ops.coeffs(*args)
    x, y, h_post, h_res, *params = boundary
    merged = ops.post_res(x, y, h_post, h_res)
    h_next = ops.coeffs(merged, *params)
    return (
        (*h, ops.pre(args[0], h[0])),
        (merged, *h_next, ops.pre(merged, h_next[0])),
        ops.post_res(*merge),
        ops.attnres(values, query, 1e-6),
    )


def _requiring_grad(group):
    return [
        t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in group
    ]


@pytest.mark.parametrize(
    "case",
    ["gradients", "autocast", "many positions", "bf16", "manifold without a kernel", "no kernel"],
)
def test_where_the_native_path_does_not_apply_the_ops_run(case, kernel_calls, monkeypatch):
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    pos = (decode.MAX_POSITIONS + 1,) if case == "many positions" else (1, 1)
    args, boundary, merge, values, query = _inputs(dtype, pos)
    if case == "manifold without a kernel":
        args = coeffs_inputs("hc", 4, pos, 16, dtype, {})
        boundary = boundary_inputs(4, pos, 16, dtype, {}, "hc")
    if case == "gradients":
        args, boundary, merge, values = (
            _requiring_grad(g) for g in (args, boundary, merge, values)
        )
    if case == "no kernel":
        monkeypatch.setattr(native, "_KERNELS", {decode.KERNEL: None, decode.ATTNRES_KERNEL: None})
    inputs = (args, boundary, merge, values, query)
    grad = torch.enable_grad() if case == "gradients" else torch.no_grad()
    with grad, torch.autocast("cpu", enabled=case == "autocast"):
        got, want = _all_calls(*inputs), _ops_calls(*inputs)
    leaves = torch.utils._pytree.tree_leaves
    if case == "manifold without a kernel":  # the merge and attnres do not depend on it
        assert kernel_calls == [decode.KERNEL, decode.ATTNRES_KERNEL]
        got, want = got[:2], want[:2]
    else:
        assert kernel_calls == []
    for g, w in zip(leaves(got), leaves(want), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    if case == "gradients":  # through the ops' autograd
        assert all(t.grad_fn is not None for t in leaves(got))
