"""Attention Residuals ops (``hcpass::attnres``, ``hcpass::attnres_backward``): the reference
against a naive autograd formula, the closed-form backward against autograd, gradcheck,
opcheck, the two phases, bad input, and the CPU lowering (the reference inlined, traced by
AOTAutograd with a list of tensors and fused by Inductor).

Tolerances (`assert_matches`): every output within ``tol * max(1, max|want|)`` elementwise
plus ``tol`` relative, against a truth computed in fp64 from the same (rounded) inputs:
fp64 1e-12, fp32 1e-5 (the fp32 accumulation), bf16 1e-2 and fp16 2e-3 (one rounding of the
output, 2^-8 and 2^-11 relative, after an fp32 accumulation). Outputs that stay in compute
dtype (the query's gradient, the phase-1 statistics) get the compute dtype's tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

import hcpass.ops  # noqa: F401  (defines the ops)
from hcpass.manifolds.base import compute_dtype
from hcpass.ops.attnres import reference

OPS = torch.ops.hcpass
EPS = 1e-6
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (k, pos, C): one value, two, five; no position dims, one, two; C not a power of two.
SHAPES = [(1, (7,), 12), (2, (), 12), (2, (2, 3), 20), (5, (7,), 12), (5, (2, 3), 36)]


def assert_matches(got, want, tol: float) -> None:
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, (index, g.shape, w.shape)
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(
            g.double(), w.double(), rtol=tol, atol=tol * scale, msg=lambda m, i=index: f"{i}: {m}"
        )


def make_inputs(k: int, pos: tuple[int, ...], C: int, dtype: torch.dtype, seed: int = 0):
    """k values of different scales and a query whose logits spread over a few units (so
    the weights are far from uniform); the query in compute dtype."""
    gen = torch.Generator().manual_seed(seed)
    values = [
        (torch.randn(*pos, C, generator=gen, dtype=torch.float64) * (0.5 + i)).to(dtype)
        for i in range(k)
    ]
    query = (2 * torch.randn(C, generator=gen, dtype=torch.float64) / math.sqrt(C)).to(
        compute_dtype(dtype)
    )
    return values, query


def naive(values, query, eps=EPS):
    """The paper's formula, literally: stack, RMSNorm the keys, logits, softmax, weighted sum."""
    V = torch.stack(values)
    K = V / torch.sqrt(V.square().mean(-1, keepdim=True) + eps)
    alpha = torch.softmax(K @ query, 0)
    return (alpha.unsqueeze(-1) * V).sum(0)


def truth(values, query, eps=EPS):
    """The naive formula in fp64 on the same inputs."""
    return naive([v.double() for v in values], query.double(), eps)


def truth_grads(grad, values, query, eps=EPS):
    leaves = [v.double().requires_grad_() for v in values]
    w = query.double().requires_grad_()
    out = naive(leaves, w, eps)
    return torch.autograd.grad(out, [*leaves, w], grad.double())


# ------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_the_naive_formula(shape, dtype):
    values, query = make_inputs(*shape, dtype)
    for h in (reference.attnres(values, query, EPS), OPS.attnres(values, query, EPS)):
        assert h.dtype == dtype and h.is_contiguous()
        assert_matches(h, truth(values, query), TOL[dtype])


def test_weights_are_far_from_uniform():
    """The inputs of these tests really test the softmax (not the mean in disguise)."""
    values, query = make_inputs(5, (7,), 12, torch.float64)
    mean = torch.stack(values).mean(0)
    assert (reference.attnres(values, query, EPS) - mean).abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_query_gives_the_mean(dtype):
    values, query = make_inputs(5, (2, 3), 20, dtype)
    want = torch.stack([v.double() for v in values]).mean(0)
    assert_matches(OPS.attnres(values, torch.zeros_like(query), EPS), want, TOL[dtype])


def test_one_value_gives_a_copy_of_it():
    (v,), query = make_inputs(1, (3,), 12, torch.float32)
    h = OPS.attnres([v], query, EPS)
    assert torch.equal(h, v) and h.data_ptr() != v.data_ptr()


def _odd_layouts(values):
    """The first value expanded over positions (stride 0), the second non-contiguous."""
    first = values[0][..., :1, :].expand(values[0].shape) if values[0].dim() > 1 else values[0]
    second = values[1].mT.contiguous().mT if values[1].dim() > 1 else values[1][::1]
    return [first, second, *values[2:]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_expanded_and_strided_values(dtype):
    values, query = make_inputs(3, (4, 5), 12, dtype)
    odd = _odd_layouts(values)
    assert odd[0].stride()[-2] == 0 and not odd[1].is_contiguous()
    dense = [v.contiguous() for v in odd]
    h = OPS.attnres(odd, query, EPS)
    assert h.is_contiguous()
    # the same math; a strided sum may add in another order
    assert_matches(h, reference.attnres(dense, query, EPS), TOL[dtype])
    grad = torch.randn_like(h)
    got = OPS.attnres_backward(grad, odd, query, EPS)
    want = reference.attnres_backward(grad, dense, query, EPS)
    assert all(g.is_contiguous() for g in got[0])
    assert_matches((*got[0], got[1]), (*want[0], want[1]), TOL[dtype])


def test_autocast_does_not_lower_the_accumulation():
    values, query = make_inputs(3, (5,), 12, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = OPS.attnres(values, query, EPS)
    assert h.dtype == torch.float32
    assert_matches(h, truth(values, query), TOL[torch.float32])


# ----------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_closed_form_backward_matches_autograd(shape, dtype):
    values, query = make_inputs(*shape, dtype)
    grad = torch.randn(values[0].shape, dtype=torch.float64).to(dtype)
    grad_values, grad_query = reference.attnres_backward(grad, values, query, EPS)
    assert [g.dtype for g in grad_values] == [dtype] * len(values)
    assert grad_query.dtype == query.dtype
    assert all(g.is_contiguous() for g in (*grad_values, grad_query))
    *want_values, want_query = truth_grads(grad, values, query)
    assert_matches(grad_values, want_values, TOL[dtype])
    assert_matches(grad_query, want_query, TOL[compute_dtype(dtype)])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_closed_form_backward_matches_autograd_of_the_reference(shape):
    values, query = make_inputs(*shape, torch.float64)
    leaves = [v.requires_grad_() for v in values]
    w = query.requires_grad_()
    h = reference.attnres(leaves, w, EPS)
    grad = torch.randn_like(h)
    want = torch.autograd.grad(h, [*leaves, w], grad, allow_unused=True)
    want = [torch.zeros_like(w) if g is None else g for g in want]  # k = 1: w unused
    grad_values, grad_query = reference.attnres_backward(grad, values, query, EPS)
    assert_matches((*grad_values, grad_query), want, TOL[torch.float64])


@pytest.mark.parametrize("shape", [(1, (3,), 6), (2, (), 6), (3, (2, 3), 5), (5, (4,), 6)], ids=str)
def test_gradcheck(shape):
    values, query = make_inputs(*shape, torch.float64)
    leaves = [v.requires_grad_() for v in values]

    def fn(*args):
        return OPS.attnres(list(args[:-1]), args[-1], EPS)

    assert torch.autograd.gradcheck(fn, (*leaves, query.requires_grad_()))


def test_op_autograd_matches_the_naive_formula_with_odd_layouts():
    values, query = make_inputs(3, (4, 5), 12, torch.float64)
    base = [v.requires_grad_() for v in values]
    w = query.requires_grad_()
    h = OPS.attnres(_odd_layouts(base), w, EPS)
    grad = torch.randn_like(h)
    got = torch.autograd.grad(h, [*base, w], grad)
    want = torch.autograd.grad(naive(_odd_layouts(base), w), [*base, w], grad)
    assert_matches(got, want, TOL[torch.float64])


# ------------------------------------------------------------------------------ opcheck
def _opcheck_cases() -> dict[str, tuple]:
    cases = {}
    for k, pos, C in [(1, (2, 3), 8), (3, (), 8), (3, (2, 3), 12)]:
        for dtype in (torch.float64, torch.bfloat16):
            values, query = make_inputs(k, pos, C, dtype)
            key = f"k{k}-pos{len(pos)}-{dtype}".replace("torch.", "")
            cases[f"attnres-{key}"] = (OPS.attnres, (values, query, EPS))
            grad = torch.randn(values[0].shape).to(dtype)
            cases[f"attnres_backward-{key}"] = (OPS.attnres_backward, (grad, values, query, EPS))
    values, query = make_inputs(3, (4, 5), 12, torch.float64)
    cases["attnres-odd-layouts"] = (OPS.attnres, (_odd_layouts(values), query, EPS))
    grad = torch.randn(values[0].shape, dtype=torch.float64)
    cases["attnres_backward-odd-layouts"] = (
        OPS.attnres_backward,
        (grad, _odd_layouts(values), query, EPS),
    )
    return cases


OPCHECK = _opcheck_cases()


@pytest.mark.parametrize("case", sorted(OPCHECK))
def test_opcheck(case):
    op, args = OPCHECK[case]
    torch.library.opcheck(op, args)
    if op is OPS.attnres:
        values, query, eps = args
        leaves = [v.detach().requires_grad_() for v in values]
        torch.library.opcheck(op, (leaves, query.detach().requires_grad_(), eps))


# ------------------------------------------------------------------------------- phases
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k, pos, C", [(2, (), 12), (2, (7,), 12), (5, (2, 3), 20)])
def test_the_two_phases_compose_to_the_op(k, pos, C, dtype):
    values, query = make_inputs(k, pos, C, dtype)
    o, m, l = reference.attnres_blocks(values[:-1], query[None], EPS)  # noqa: E741
    acc = compute_dtype(dtype)
    assert (o.shape, m.shape, l.shape) == ((1, *pos, C), (1, *pos), (1, *pos))
    assert o.dtype == m.dtype == l.dtype == acc
    h = reference.attnres_merge(o[0], m[0], l[0], values[-1], query, EPS)
    assert h.dtype == dtype and h.is_contiguous()
    assert_matches(h, truth(values, query), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_phase_one_statistics(dtype):
    """o, m, l of S = 3 queries at once, against their definitions per query in fp64."""
    blocks, _ = make_inputs(4, (2, 5), 20, dtype)
    acc = compute_dtype(dtype)
    queries = torch.stack([make_inputs(1, (), 20, dtype, seed=s)[1] for s in (1, 2, 3)])
    queries[2] = 0  # uniform weights
    o, m, l = reference.attnres_blocks(blocks, queries, EPS)  # noqa: E741
    for s in range(3):
        V = torch.stack([b.double() for b in blocks])
        logits = (V / V.square().mean(-1, keepdim=True).add(EPS).sqrt()) @ queries[s].double()
        want_m = logits.amax(0)
        want_l = torch.exp(logits - want_m).sum(0)
        assert_matches((m[s], l[s]), (want_m, want_l), TOL[acc])
        assert_matches(o[s], truth(blocks, queries[s]), TOL[acc])


def test_merge_with_an_empty_history_is_the_partial_block():
    """l = 0 (no completed block contributes) leaves h = the partial block."""
    (p,), query = make_inputs(1, (7,), 12, torch.float32)
    o, m, l = torch.zeros_like(p), torch.zeros(7), torch.zeros(7)  # noqa: E741
    torch.testing.assert_close(reference.attnres_merge(o, m, l, p, query, EPS), p)


# ---------------------------------------------------------------------------- bad input
def _bad_inputs():
    values, query = make_inputs(3, (4,), 12, torch.float32)
    v0, v1, v2 = values
    return [
        ("empty", ([], query), "empty"),
        ("shape", ([v0, v1[:3], v2], query), r"values\[1\] is \(3, 12\)"),
        ("channels", ([v0, v1[..., :8], v2], query), r"values\[1\]"),
        ("dtype", ([v0, v1.double(), v2], query), r"values\[1\] is .*float64"),
        ("integer", ([v.long() for v in values], query), "fp32, fp64, bf16 or fp16"),
        ("query-size", (values, query[:8]), r"query must be \[C\] with C = 12"),
        ("query-rank", (values, query[None]), r"query must be \[C\]"),
        ("query-integer", (values, query.long()), "query must be floating"),
        ("scalar", ([torch.tensor(1.0)], query), "channel dimension"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_raises_a_clear_error(case):
    _, (values, query), message = case
    with pytest.raises(ValueError, match=message):
        OPS.attnres(values, query, EPS)
    if values:
        grad = torch.zeros(values[0].shape)
        with pytest.raises(ValueError, match=message):
            OPS.attnres_backward(grad, values, query, EPS)
    with pytest.raises(ValueError, match=message):  # the fake kernel checks too
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            OPS.attnres([mode.from_tensor(v) for v in values], mode.from_tensor(query), EPS)


def test_phases_reject_bad_input():
    values, query = make_inputs(3, (4,), 12, torch.float32)
    with pytest.raises(ValueError, match="blocks is empty"):
        reference.attnres_blocks([], query[None], EPS)
    with pytest.raises(ValueError, match=r"\[S, C\]"):
        reference.attnres_blocks(values, query, EPS)
    o, m, l = reference.attnres_blocks(values[:2], query[None], EPS)  # noqa: E741
    with pytest.raises(ValueError, match="do not fit"):
        reference.attnres_merge(o, m[0], l[0], values[2], query, EPS)


# -------------------------------------------------------------------------- CPU lowering
def test_reference_is_in_the_cpu_lowering_table():
    from hcpass.ops import REFERENCE

    assert REFERENCE[OPS.attnres.default] is hcpass.ops.attnres.library._attnres_ref
    assert OPS.attnres_backward.default in REFERENCE


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_cpu_lowering_inlines_the_reference(compiler):
    """The ops lowered to the reference as the hcpass backend does on CPU, traced by Dynamo
    and AOTAutograd with the values as a Python list: forward and gradients as eager."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import compile_fx

    from hcpass.lowering.backend import lowering

    seen = []

    def backend(gm, example_inputs):
        lowering(cuda=False)(gm.graph)
        gm.recompile()
        seen.extend(n.target for n in gm.graph.nodes)
        if compiler == "inductor":
            return compile_fx(gm, example_inputs)
        boxed = lambda g, _: make_boxed_func(g)
        return aot_autograd(fw_compiler=boxed, bw_compiler=boxed)(gm, example_inputs)

    def block(x, w1, w2):
        a = torch.tanh(x)
        b = a * 2 + x
        # the overload, as the rewrite emits it (the packet would stay a Dynamo target)
        attnres = torch.ops.hcpass.attnres.default
        return attnres([x, a, b], w1, EPS) + attnres([x, b], w2, EPS)

    torch._dynamo.reset()
    values, query = make_inputs(1, (3, 4), 12, torch.float32)
    args = [values[0], query, 0.5 * query.flip(0)]
    leaves = [a.clone().requires_grad_() for a in args]
    eager = [a.clone().requires_grad_() for a in args]
    out = torch.compile(block, backend=backend, fullgraph=True)(*leaves)
    want = block(*eager)
    assert OPS.attnres.default not in seen
    assert hcpass.ops.REFERENCE[OPS.attnres.default] in seen
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    want.square().sum().backward()
    for a, b in zip(leaves, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
