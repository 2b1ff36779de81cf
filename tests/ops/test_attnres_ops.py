"""Attention Residuals ops (``hcpass::attnres``, its two phases ``attnres_blocks`` and
``attnres_merge``, and their backward ops): the reference against a naive autograd formula,
the closed-form backward against autograd, gradcheck, opcheck, the two phases composed
against the op (values and gradients), bad input, the CPU lowering (the reference inlined, traced by
AOTAutograd with a list of tensors and fused by Inductor), and the Triton kernels
(`hcpass.codegen.attnres`: the two phases, the op, its backward) in Triton's interpreter, in
a worker process as in tests/test_codegen.py; they also compile for sm_90 without a GPU.

Tolerances (`assert_matches`): every output within ``tol * max(1, max|want|)`` elementwise
plus ``tol`` relative, against a truth computed in fp64 from the same (rounded) inputs:
fp64 1e-12, fp32 1e-5 (the fp32 accumulation), bf16 1e-2 and fp16 2e-3 (one rounding of the
output, 2^-8 and 2^-11 relative, after an fp32 accumulation). Outputs that stay in compute
dtype (the query's gradient, the phase-1 statistics) get the compute dtype's tolerance.
Kernels against the reference (`KERNEL_TOL`, as tests/test_codegen.py): fp64 1e-11, fp32
1e-5; bf16 1e-2 (the worker's interpreter rounds fp32 to bf16 to nearest even as a GPU does,
tests/interpreter.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
from hcpass.codegen import attnres as kernels
from hcpass.codegen import generate, register_cuda_kernels

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


def _queries(S: int, C: int, dtype: torch.dtype) -> torch.Tensor:
    """S queries in compute dtype, the last zero (uniform weights)."""
    queries = torch.stack([make_inputs(1, (), C, dtype, seed=10 + s)[1] for s in range(S)])
    queries[-1] = 0
    return queries


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
    for n, S, pos in [(1, 1, (2, 3)), (3, 2, ()), (2, 3, (5,))]:
        for dtype in (torch.float64, torch.bfloat16):
            values, _ = make_inputs(n + 1, pos, 8, dtype)
            blocks, partial = values[:-1], values[-1]
            queries = _queries(S, 8, dtype)
            o, lse = reference.attnres_blocks(blocks, queries, EPS)
            key = f"n{n}-S{S}-pos{len(pos)}-{dtype}".replace("torch.", "")
            cases[f"attnres_blocks-{key}"] = (OPS.attnres_blocks, (blocks, queries, EPS))
            cases[f"attnres_blocks_backward-{key}"] = (
                OPS.attnres_blocks_backward,
                (torch.randn_like(o), torch.randn_like(lse), blocks, queries, o, lse, EPS),
            )
            merge = (o[0], lse[0], partial, queries[0], EPS)
            cases[f"attnres_merge-{key}"] = (OPS.attnres_merge, merge)
            grad = torch.randn(partial.shape).to(dtype)
            cases[f"attnres_merge_backward-{key}"] = (OPS.attnres_merge_backward, (grad, *merge))
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
    if op in (OPS.attnres, OPS.attnres_blocks, OPS.attnres_merge):  # and their autograd
        leaves = [
            [v.detach().requires_grad_() for v in a]
            if isinstance(a, list)
            else a.detach().requires_grad_()
            if isinstance(a, torch.Tensor)
            else a
            for a in args
        ]
        torch.library.opcheck(op, leaves)


# ------------------------------------------------------------------------------- phases
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k, pos, C", [(2, (), 12), (2, (7,), 12), (5, (2, 3), 20)])
def test_the_two_phases_compose_to_the_op(k, pos, C, dtype):
    values, query = make_inputs(k, pos, C, dtype)
    o, lse = reference.attnres_blocks(values[:-1], query[None], EPS)
    acc = compute_dtype(dtype)
    assert (o.shape, lse.shape) == ((1, *pos, C), (1, *pos))
    assert o.dtype == lse.dtype == acc
    h = reference.attnres_merge(o[0], lse[0], values[-1], query, EPS)
    assert h.dtype == dtype and h.is_contiguous()
    assert_matches(h, truth(values, query), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_phase_one_statistics(dtype):
    """o and lse of S = 3 queries at once, against their definitions per query in fp64."""
    blocks, _ = make_inputs(4, (2, 5), 20, dtype)
    acc = compute_dtype(dtype)
    queries = _queries(3, 20, dtype)
    o, lse = reference.attnres_blocks(blocks, queries, EPS)
    for s in range(3):
        V = torch.stack([b.double() for b in blocks])
        logits = (V / V.square().mean(-1, keepdim=True).add(EPS).sqrt()) @ queries[s].double()
        assert_matches(lse[s], torch.logsumexp(logits, 0), TOL[acc])
        assert_matches(o[s], truth(blocks, queries[s]), TOL[acc])


def test_merge_with_an_empty_history_is_the_partial_block():
    """lse = -inf (no completed block contributes) leaves h = the partial block."""
    (p,), query = make_inputs(1, (7,), 12, torch.float32)
    o, lse = torch.zeros_like(p), torch.full((7,), -math.inf)
    torch.testing.assert_close(reference.attnres_merge(o, lse, p, query, EPS), p)


def _phases(values, queries, partials, eps=EPS, ops=reference):
    """Each query's h through phase 1 over the shared blocks and phase 2 with its partial."""
    o, lse = ops.attnres_blocks(values, queries, eps)
    return [ops.attnres_merge(o[s], lse[s], p, queries[s], eps) for s, p in enumerate(partials)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, S, pos, C", [(1, 1, (7,), 12), (3, 2, (), 12), (4, 3, (2, 3), 20)])
def test_phase_backwards_match_autograd_of_their_references(n, S, pos, C, dtype):
    """The closed forms of both phases against torch.autograd through the references (in
    fp64 from the same rounded inputs), every gradient in its input's dtype."""
    values, _ = make_inputs(n + 1, pos, C, dtype)
    blocks, partial = values[:-1], values[-1]
    queries = _queries(S, C, dtype)
    o, lse = reference.attnres_blocks(blocks, queries, EPS)
    gen = torch.Generator().manual_seed(5)
    grad_o, grad_lse = (torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (o, lse))
    grad_h = torch.randn(partial.shape, generator=gen, dtype=torch.float64).to(dtype)
    acc = compute_dtype(dtype)

    leaves = [b.double().requires_grad_() for b in blocks]
    w = queries.double().requires_grad_()
    want = torch.autograd.grad(
        reference.attnres_blocks(leaves, w, EPS), [*leaves, w], (grad_o.double(), grad_lse.double())
    )
    got_blocks, got_w = reference.attnres_blocks_backward(
        grad_o, grad_lse, blocks, queries, o, lse, EPS
    )
    assert [g.dtype for g in got_blocks] == [dtype] * n and got_w.dtype == queries.dtype
    assert_matches(got_blocks, want[:-1], TOL[dtype])
    assert_matches(got_w, want[-1], TOL[acc])

    merge_inputs = [o[0], lse[0], partial, queries[0]]
    leaves = [t.double().requires_grad_() for t in merge_inputs]
    want = torch.autograd.grad(reference.attnres_merge(*leaves, EPS), leaves, grad_h.double())
    got = reference.attnres_merge_backward(grad_h, *merge_inputs, EPS)
    assert [g.dtype for g in got] == [t.dtype for t in merge_inputs]
    assert all(g.is_contiguous() for g in got)
    for g, want_g, t in zip(got, want, merge_inputs, strict=True):
        assert_matches(g, want_g, TOL[t.dtype])


@pytest.mark.parametrize("S, pos", [(1, (3,)), (2, ()), (3, (2, 3))], ids=str)
def test_phases_gradcheck(S, pos):
    values, _ = make_inputs(4, pos, 5, torch.float64)
    blocks = [v.requires_grad_() for v in values[:-1]]
    partials = [values[-1].requires_grad_()] + [
        make_inputs(1, pos, 5, torch.float64, seed=s)[0][0].requires_grad_() for s in range(1, S)
    ]
    queries = _queries(S, 5, torch.float64)
    queries.requires_grad_()

    def fn(*args):
        return tuple(_phases(list(args[:3]), args[3], args[4:], ops=OPS))

    assert torch.autograd.gradcheck(fn, (*blocks, queries, *partials))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k, pos, C", [(2, (7,), 12), (5, (2, 3), 20)])
def test_the_phase_ops_compose_to_the_op_with_its_gradients(k, pos, C, dtype):
    """``attnres_merge(*attnres_blocks(values[:-1], w[None])[0], values[-1], w)`` is
    ``attnres(values, w)``, and so are the gradients autograd gives through the four ops."""
    values, query = make_inputs(k, pos, C, dtype)
    grad = torch.randn(values[0].shape, dtype=torch.float64).to(dtype)
    runs = []
    for split in (False, True):
        leaves = [v.clone().requires_grad_() for v in values]
        w = query.clone().requires_grad_()
        h = _phases(leaves[:-1], w[None], leaves[-1:], ops=OPS)[0] if split else None
        h = OPS.attnres(leaves, w, EPS) if h is None else h
        runs.append((h, *torch.autograd.grad(h, [*leaves, w], grad)))
    split, whole = runs[1], runs[0]
    assert all(s.dtype == w.dtype for s, w in zip(split, whole, strict=True))
    assert_matches(split[:-1], whole[:-1], TOL[dtype])
    assert_matches(split[-1], whole[-1], TOL[compute_dtype(dtype)])


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


def test_backward_rejects_a_grad_of_another_shape():
    values, query = make_inputs(3, (4,), 12, torch.float32)
    with pytest.raises(ValueError, match=r"grad is \(3, 12\)"):
        OPS.attnres_backward(torch.zeros(3, 12), values, query, EPS)
    with pytest.raises(ValueError, match=r"grad is \(3, 12\)"):
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = [mode.from_tensor(t) for t in (torch.zeros(3, 12), *values, query)]
            OPS.attnres_backward(fake[0], fake[1:-1], fake[-1], EPS)


def _bad_phase_calls():
    """(name, the phase ops' call on real or fake tensors, the error message)."""
    values, query = make_inputs(3, (4,), 12, torch.float32)
    o, lse = reference.attnres_blocks(values[:2], query[None], EPS)
    grad_lse = torch.zeros_like(lse)
    # views made here: the calls run under a fake mode too, which takes only fake tensors
    rows, two_rows, short_lse = query[None], query.expand(2, 12), grad_lse[..., :2]
    o_0, lse_0, short_grad = o[0], lse[0], values[2][:2]
    return [
        ("blocks-empty", lambda t: OPS.attnres_blocks([], t(rows), EPS), "blocks is empty"),
        (
            "queries-rank",
            lambda t: OPS.attnres_blocks([t(v) for v in values], t(query), EPS),
            r"\[S, C\]",
        ),
        (
            "merge-o",
            lambda t: OPS.attnres_merge(t(o), t(lse_0), t(values[2]), t(query), EPS),
            r"lse \(4,\) do not fit",
        ),
        (
            "merge-grad",
            lambda t: OPS.attnres_merge_backward(
                t(short_grad), t(o_0), t(lse_0), t(values[2]), t(query), EPS
            ),
            r"grad is \(2, 12\)",
        ),
        (
            "blocks-backward-lse",
            lambda t: OPS.attnres_blocks_backward(
                t(o),
                t(short_lse),
                [t(v) for v in values[:2]],
                t(rows),
                t(o),
                t(lse),
                EPS,
            ),
            r"lse \(1, 2\)",
        ),
        (
            "blocks-backward-queries",
            lambda t: OPS.attnres_blocks_backward(
                t(o),
                t(grad_lse),
                [t(v) for v in values[:2]],
                t(two_rows),
                t(o),
                t(lse),
                EPS,
            ),
            "do not fit 2 queries",
        ),
    ]


@pytest.mark.parametrize("case", _bad_phase_calls(), ids=lambda c: c[0])
def test_phases_reject_bad_input(case):
    """The ops and their fake kernels raise the same clear error."""
    _, call, message = case
    with pytest.raises(ValueError, match=message):
        call(lambda t: t)
    with pytest.raises(ValueError, match=message):
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            call(mode.from_tensor)


# -------------------------------------------------------------------------- CPU lowering
def test_reference_is_in_the_cpu_lowering_table():
    from hcpass.ops import REFERENCE

    assert REFERENCE[OPS.attnres.default] is hcpass.ops.attnres.library._attnres_ref
    for name in ("backward", "blocks", "blocks_backward", "merge", "merge_backward"):
        assert getattr(OPS, f"attnres_{name}").default in REFERENCE, name


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_cpu_lowering_inlines_the_reference(compiler):
    """The ops lowered to the reference as the hcpass backend does on CPU, traced by Dynamo
    and AOTAutograd with the values as a Python list: forward and gradients as eager."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import compile_fx

    from hcpass.lowering.passes import pass_plan

    seen = []

    def backend(gm, example_inputs):
        pass_plan(cuda=False).lower(gm.graph)
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


# --------------------------------------------------------------- Triton, in the interpreter
KERNEL_TOL = {torch.float32: 1e-5, torch.float64: 1e-11, torch.bfloat16: 1e-2}
KERNEL_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _row_views(values):
    """Values of 1-d positions the kernels read in place, each with other strides: expanded
    over positions (stride 0), every other channel of a wider buffer, channel-major."""
    P, C = values[0].shape
    wide = torch.zeros(P, 2 * C, dtype=values[1].dtype)
    wide[:, ::2] = values[1]
    views = [values[0][:1].expand(P, C), wide[:, ::2], values[2].T.contiguous().T]
    assert [v.view(P, C).stride() for v in views] == [(0, 1), (2 * C, 2), (1, P)]
    return views + values[3:]


LAYOUTS = {None: lambda values: values, "odd": _odd_layouts, "rows": _row_views}


def run_blocks_case(n, S, pos, C, dtype, layout=None) -> None:
    blocks, _ = make_inputs(n, pos, C, dtype)
    blocks = LAYOUTS[layout](blocks)
    queries = _queries(S, C, dtype)
    got = kernels.attnres_blocks(blocks, queries, EPS)
    want = reference.attnres_blocks(blocks, queries, EPS)
    assert all(g.dtype == w.dtype and g.is_contiguous() for g, w in zip(got, want, strict=True))
    assert_matches(got, want, KERNEL_TOL[compute_dtype(dtype)])


def run_merge_case(n, pos, C, dtype, layout=None) -> None:
    values, query = make_inputs(n + 1, pos, C, dtype)
    values = LAYOUTS[layout](values[::-1])[::-1]  # the partial block in the first layout
    o, lse = (t[0] for t in reference.attnres_blocks(values[:-1], query[None], EPS))
    got = kernels.attnres_merge(o, lse, values[-1], query, EPS)
    assert got.dtype == dtype and got.is_contiguous()
    assert_matches(got, reference.attnres_merge(o, lse, values[-1], query, EPS), KERNEL_TOL[dtype])


def run_merge_backward_case(n, pos, C, dtype, layout=None) -> None:
    values, query = make_inputs(n + 1, pos, C, dtype)
    values = LAYOUTS[layout](values[::-1])[::-1]
    o, lse = (t[0] for t in reference.attnres_blocks(values[:-1], query[None], EPS))
    grad = torch.randn(values[0].shape, dtype=torch.float64).to(dtype)
    inputs = (o, lse, values[-1], query)
    got = kernels.attnres_merge_backward(grad, *inputs, EPS)
    want = reference.attnres_merge_backward(grad, *inputs, EPS)
    assert [g.dtype for g in got] == [t.dtype for t in inputs]
    assert all(g.is_contiguous() for g in got)
    for g, w, t in zip(got, want, inputs, strict=True):
        assert_matches(g, w, KERNEL_TOL[t.dtype])


def run_blocks_backward_case(n, S, pos, C, dtype, layout=None) -> None:
    blocks, _ = make_inputs(n, pos, C, dtype)
    blocks = LAYOUTS[layout](blocks)
    queries = _queries(S, C, dtype)
    o, lse = reference.attnres_blocks(blocks, queries, EPS)
    gen = torch.Generator().manual_seed(4)
    grad_o, grad_lse = (torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (o, lse))
    args = (grad_o, grad_lse, blocks, queries, o, lse, EPS)
    got_blocks, got_w = kernels.attnres_blocks_backward(*args)
    want_blocks, want_w = reference.attnres_blocks_backward(*args)
    assert all(g.dtype == dtype and g.is_contiguous() for g in got_blocks)
    assert got_w.dtype == queries.dtype
    assert_matches(got_blocks, want_blocks, KERNEL_TOL[dtype])
    assert_matches(got_w, want_w, KERNEL_TOL[compute_dtype(dtype)])


def run_op_case(k, pos, C, dtype, layout=None) -> None:
    values, query = make_inputs(k, pos, C, dtype)
    values = LAYOUTS[layout](values)
    for w in (query, torch.zeros_like(query)):
        got = kernels.attnres(values, w, EPS)
        assert got.dtype == dtype and got.is_contiguous()
        assert_matches(got, reference.attnres(values, w, EPS), KERNEL_TOL[dtype])


def run_backward_case(k, pos, C, dtype, layout=None) -> None:
    values, query = make_inputs(k, pos, C, dtype)
    values = LAYOUTS[layout](values)
    grad = torch.randn(values[0].shape, dtype=torch.float64).to(dtype)
    grad_values, grad_query = kernels.attnres_backward(grad, values, query, EPS)
    assert all(g.dtype == dtype and g.is_contiguous() for g in grad_values)
    assert grad_query.dtype == query.dtype
    want_values, want_query = reference.attnres_backward(grad, values, query, EPS)
    assert_matches(grad_values, want_values, KERNEL_TOL[dtype])
    assert_matches(grad_query, want_query, KERNEL_TOL[compute_dtype(dtype)])


# (n blocks, S queries, pos, C): one block, several; one query, a few, 17 (two query tiles of
# 16); 0/1/2 position dims, 21 positions (two tiles of 16); C in one chunk of 64, or three.
BLOCKS_CASES = [
    (1, 1, (7,), 40),
    (4, 3, (), 40),
    (4, 1, (21,), 150),
    (3, 17, (2, 5), 40),
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", BLOCKS_CASES, ids=str)
def test_phase_one_kernel(interpreter, case, dtype):
    interpreter.submit(run_blocks_case, *case, dtype).result()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "case", [(1, (7,), 40), (3, (), 40), (4, (21,), 150), (2, (2, 5), 40)], ids=str
)
def test_phase_two_kernel(interpreter, case, dtype):
    interpreter.submit(run_merge_case, *case, dtype).result()


# (n blocks, S queries, pos, C): n = 1..4, S = 1..5, 0/1/2 position dims, odd position
# counts (21: two tiles of 16), C not a power of two (in one chunk of 64, or three).
PHASE_BACKWARD_CASES = [
    (1, 1, (7,), 40),
    (2, 5, (), 40),
    (4, 3, (21,), 150),
    (3, 2, (3, 5), 40),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", PHASE_BACKWARD_CASES, ids=str)
def test_phase_one_backward_kernel(interpreter, case, dtype):
    interpreter.submit(run_blocks_backward_case, *case, dtype).result()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(n, pos, C) for n, _, pos, C in PHASE_BACKWARD_CASES], ids=str)
def test_phase_two_backward_kernel(interpreter, case, dtype):
    interpreter.submit(run_merge_backward_case, *case, dtype).result()


# (k, pos, C): one value (a copy), two, five over two position tiles and three C chunks.
OP_KERNEL_CASES = [(1, (7,), 40), (2, (), 40), (5, (21,), 150), (3, (2, 5), 40)]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", OP_KERNEL_CASES, ids=str)
def test_attnres_kernel(interpreter, case, dtype):
    """Phase 1 over values[:-1], phase 2 with values[-1] (k = 1: a copy); query and zero."""
    interpreter.submit(run_op_case, *case, dtype).result()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", OP_KERNEL_CASES, ids=str)
def test_backward_kernel(interpreter, case, dtype):
    interpreter.submit(run_backward_case, *case, dtype).result()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["rows", "odd"])
def test_kernels_read_expanded_and_strided_values(interpreter, layout, dtype):
    """rows: blocks read in place with their own strides (one expanded over positions), as
    the partial block too; odd: 2-d positions that do not flatten (copied)."""
    pos = (13,) if layout == "rows" else (4, 5)
    interpreter.submit(run_blocks_case, 3, 2, pos, 40, dtype, layout).result()
    interpreter.submit(run_merge_case, 3, pos, 40, dtype, layout).result()
    interpreter.submit(run_op_case, 3, pos, 40, dtype, layout).result()
    interpreter.submit(run_backward_case, 3, pos, 40, dtype, layout).result()
    interpreter.submit(run_blocks_backward_case, 3, 2, pos, 40, dtype, layout).result()
    interpreter.submit(run_merge_backward_case, 3, pos, 40, dtype, layout).result()


# ------------------------------------------------------------------ without a GPU, compiled
@pytest.mark.skipif(generate.interpreted(), reason="triton imported interpreted")
def test_attnres_kernels_refuse_cpu_tensors():
    values, query = make_inputs(3, (4,), 12, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.attnres(values, query, EPS)


def test_register_cuda_kernels_installs_attnres():
    register_cuda_kernels()
    for name in kernels.LAUNCHERS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hcpass::{name}", "CUDA"), name
    values, query = make_inputs(3, (4,), 12, torch.float32)  # CPU keeps the reference
    torch.testing.assert_close(
        OPS.attnres(values, query, EPS), reference.attnres(values, query, EPS)
    )


TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
}


@pytest.mark.skipif(generate.interpreted(), reason="triton imported interpreted")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_attnres_kernels_compile_for_sm90(monkeypatch, dtype):
    """Every kernel, with the arguments its launcher passes (phase 1 with 1 and 8 queries,
    its backward with 2 and 5), compiles to an sm_90 (H100/H200) binary -- no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = []
    monkeypatch.setattr(kernels, "_launch", lambda k, grid, *a, **kw: launches.append((k, a, kw)))
    monkeypatch.setattr(kernels, "_check_device", lambda *tensors: None)
    values, query = make_inputs(4, (16,), 1000, dtype)
    kernels.attnres(values, query, EPS)
    kernels.attnres_blocks(values, _queries(8, 1000, dtype), EPS)
    kernels.attnres_backward(torch.ones_like(values[0]), values, query, EPS)
    queries = _queries(5, 1000, dtype)
    o, lse = reference.attnres_blocks(values[:2], queries[:2], EPS)
    kernels.attnres_merge_backward(torch.ones_like(values[0]), o[0], lse[0], values[2], query, EPS)
    kernels.attnres_blocks_backward(o, lse, values[:2], queries[:2], o, lse, EPS)
    o, lse = reference.attnres_blocks(values[:2], queries, EPS)
    kernels.attnres_blocks_backward(o, lse, values[:2], queries, o, lse, EPS)
    assert [k.fn.__name__ for k, *_ in launches] == [
        "attnres_blocks_kernel",
        "attnres_merge_kernel",
        "attnres_blocks_kernel",
        "attnres_bwd_kernel",
        "attnres_merge_bwd_kernel",
        "attnres_blocks_bwd_kernel",
        "attnres_blocks_bwd_kernel",
    ]
    for kernel, args, kwargs in launches:
        constants = {k: v for k, v in kwargs.items() if k != "num_warps"}
        signature = {}
        for name, value in zip(kernel.arg_names, args, strict=False):
            if isinstance(value, torch.Tensor):
                signature[name] = "*" + TRITON_TYPES[value.dtype]
            else:
                signature[name] = "fp32" if isinstance(value, float) else "i32"
        signature.update({name: "constexpr" for name in constants})
        compiled = triton.compile(
            ASTSource(kernel, signature, constants),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": kwargs["num_warps"]},
        )
        assert compiled.asm["cubin"], kernel.fn.__name__


# ---------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# bf16: one output rounding after a differently ordered fp32 sum; fp32: the same products.
GPU_TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_cuda_kernels_match_reference(k, dtype):
    values, query = make_inputs(k, (3, 345), 1000, dtype)
    values, query = [v.cuda() for v in values], query.cuda()
    assert_matches(
        kernels.attnres(values, query, EPS), reference.attnres(values, query, EPS), GPU_TOL[dtype]
    )
    queries = _queries(6, 1000, dtype).cuda()
    assert_matches(
        kernels.attnres_blocks(values, queries, EPS),
        reference.attnres_blocks(values, queries, EPS),
        GPU_TOL[torch.float32],
    )
    grad = torch.randn_like(values[0])
    got_values, got_query = kernels.attnres_backward(grad, values, query, EPS)
    want_values, want_query = reference.attnres_backward(grad, values, query, EPS)
    assert_matches(got_values, want_values, GPU_TOL[dtype])
    assert_matches(got_query, want_query, GPU_TOL[torch.float32])
    # the phases' backward: phase 1 for the 6 queries, the merge of the first
    o, lse = reference.attnres_blocks(values, queries, EPS)
    args = (torch.randn_like(o), torch.randn_like(lse), values, queries, o, lse, EPS)
    got_values, got_query = kernels.attnres_blocks_backward(*args)
    want_values, want_query = reference.attnres_blocks_backward(*args)
    assert_matches(got_values, want_values, GPU_TOL[dtype])
    assert_matches(got_query, want_query, GPU_TOL[torch.float32])
    inputs = (o[0], lse[0], values[-1], queries[0])
    got = kernels.attnres_merge_backward(grad, *inputs, EPS)
    want = reference.attnres_merge_backward(grad, *inputs, EPS)
    for g, w, t in zip(got, want, inputs, strict=True):
        assert_matches(g, w, GPU_TOL[t.dtype])


@pytest.mark.gpu
@needs_cuda
def test_cuda_op_runs_the_kernels_and_differentiates():
    register_cuda_kernels()
    values, query = make_inputs(4, (2, 64), 256, torch.bfloat16)
    leaves = [v.cuda().requires_grad_() for v in values]
    w = query.cuda().requires_grad_()
    h = OPS.attnres(leaves, w, EPS)
    assert_matches(h, reference.attnres(leaves, w, EPS), GPU_TOL[torch.bfloat16])
    grad = torch.randn_like(h)
    got = torch.autograd.grad(h, [*leaves, w], grad)  # the backward kernel
    gv, gw = reference.attnres_backward(grad, leaves, w, EPS)
    assert_matches(got[:-1], gv, GPU_TOL[torch.bfloat16])
    assert_matches(got[-1], gw, GPU_TOL[torch.float32])
