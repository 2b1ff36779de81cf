"""Properties of every built-in manifold, the Sinkhorn implicit backward, option validation
and the extension example of docs/extending.md.

Tolerances. Every manifold casts its logits to fp32 before computing (fp64 stays fp64), so
a bf16 input only changes *which* logits are tested, not the arithmetic: bf16 and fp32
inputs share the fp32 tolerance ``FP32_TOL``. The Cayley-based maps (stiefel, grassmann)
lose orthogonality like ``cond(I + W) * eps``, which grows with the logits, hence
``cayley_tol``. Gradient checks run in fp64 with gradcheck's default tolerances; implicit
vs unrolled Sinkhorn gradients agree to 1e-10 in fp64 and 1e-5 in fp32 at 200 iterations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import hcpass.ops  # noqa: F401  (registers torch.ops.hcpass)
from hcpass.manifolds import Manifold, available, create, resolve
from hcpass.manifolds.base import INIT_ONLY, INITS, MIXED_DIAGONAL
from hcpass.manifolds.sinkhorn import sinkhorn, sinkhorn_vjp
from hcpass.runtime.mixer import Mixer
from tests.op_inputs import saturated_sinkhorn_inputs, sinkhorn_fp64_reference

registry = hcpass.manifolds

FP32_TOL = 1e-5
EPS32 = torch.finfo(torch.float32).eps
LOGIT_SCALES = (1.0, 30.0, 1e4)
DTYPES = (torch.float32, torch.bfloat16)

# (name, streams, options): every built-in manifold, with the sinkhorn backward variants.
CASES = [
    ("hc", 4, {}),
    ("sinkhorn", 4, {}),
    ("sinkhorn", 4, {"sinkhorn_backward": "implicit", "sinkhorn_iters": 200}),
    ("permutation", 3, {}),
    ("permutation", 4, {}),
    ("kronecker", 4, {}),
    ("kronecker", 8, {}),
    ("spectral", 3, {}),
    ("spectral", 4, {}),
    ("stiefel", 3, {}),
    ("stiefel", 4, {}),
    ("grassmann", 4, {}),
    ("grassmann", 5, {"rank": 3}),
]
# n = 1 and 2 are legal for every manifold and degenerate for most: cover them too.
SMALL_CASES = [
    (name, n, {})
    for name in ("hc", "sinkhorn", "permutation", "kronecker", "spectral", "stiefel", "grassmann")
    for n in (1, 2)
]


def cases(*groups: list[tuple[str, int, dict[str, Any]]]) -> list[Any]:
    """pytest params (name, n, opts) with readable ids, e.g. ``sinkhorn-n4-implicit-200``."""
    return [
        pytest.param(name, n, opts, id=f"{name}-n{n}" + "".join(f"-{v}" for v in opts.values()))
        for group in groups
        for name, n, opts in group
    ]


def random_logits(m: Manifold, scale: float, dtype: torch.dtype, batch: int = 64) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, m.res_logits, generator=gen, dtype=torch.float64) * scale).to(dtype)


def cayley_tol(logits: Tensor) -> float:
    return 16 * EPS32 * max(1.0, logits.float().abs().max().item())


def max_err(a: Tensor, b: Tensor | float) -> float:
    return (a - b).abs().max().item()


def eye(n: int) -> Tensor:
    return torch.eye(n, dtype=torch.float32)


# ------------------------------------------------------------------------------ registry
def test_every_builtin_listed_with_one_line_description() -> None:
    listing = available()
    expected = {
        "hc",
        "sinkhorn (mhc)",
        "permutation (mhc-lite)",
        "kronecker (kromhc)",
        "spectral (shc)",
        "stiefel (jpmhc)",
        "grassmann",
    }
    assert expected <= set(listing)
    for label, description in listing.items():
        assert description.strip() and "\n" not in description, label


@pytest.mark.parametrize(("name", "n", "opts"), cases(CASES, SMALL_CASES))
def test_spec_round_trip(name: str, n: int, opts: dict[str, Any]) -> None:
    m = create(name, n, **opts)
    resolved = resolve(m.spec())
    assert resolved.spec() == m.spec()
    # what the ops compute is all in the spec; where the parameters start is not
    assert {k: v for k, v in resolved.config.items() if k not in INIT_ONLY} == {
        k: v for k, v in m.config.items() if k not in INIT_ONLY
    }
    h = m.res_map(m.res_identity_bias())
    assert h.shape == (n, n) and h.dtype == torch.float32


# ------------------------------------------------------------------- H_res properties
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", LOGIT_SCALES)
@pytest.mark.parametrize(("name", "n", "opts"), cases(CASES, SMALL_CASES))
def test_res_map_finite_fp32_output(
    name: str, n: int, opts: dict[str, Any], scale: float, dtype: torch.dtype
) -> None:
    m = create(name, n, **opts)
    h = m.res_map(random_logits(m, scale, dtype))
    assert h.shape == (64, n, n) and h.dtype == torch.float32
    assert h.isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinkhorn_converges_as_iterations_grow(dtype: torch.dtype) -> None:
    # Ending on the row step makes rows exact at every iteration count; the column error
    # shrinks with iterations. Moderate logits: saturated ones may never balance (zeros).
    errors = []
    for iters in (1, 3, 10, 30, 100):
        m = create("sinkhorn", 4, sinkhorn_iters=iters)
        h = m.res_map(random_logits(m, 1.0, dtype))
        assert max_err(h.sum(-1), 1.0) < FP32_TOL
        assert (h >= 0).all()
        errors.append(max_err(h.sum(-2), 1.0))
    assert all(b <= a + EPS32 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 1e-3 and errors[-1] < FP32_TOL, errors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", LOGIT_SCALES)
@pytest.mark.parametrize(
    ("name", "n"),
    [
        ("permutation", 1),
        ("permutation", 2),
        ("permutation", 4),
        ("kronecker", 1),
        ("kronecker", 2),
        ("kronecker", 8),
    ],
)
def test_exactly_doubly_stochastic(name: str, n: int, scale: float, dtype: torch.dtype) -> None:
    m = create(name, n)
    h = m.res_map(random_logits(m, scale, dtype))
    assert (h >= 0).all()
    assert max_err(h.sum(-1), 1.0) < FP32_TOL
    assert max_err(h.sum(-2), 1.0) < FP32_TOL


def test_kronecker_matches_torch_kron() -> None:
    m = create("kronecker", 8)
    logits = random_logits(m, 1.0, torch.float32, batch=1)[0]
    factors = [torch.softmax(pair, -1) for pair in logits.view(3, 2)]
    mats = [torch.stack([torch.stack([p, q]), torch.stack([q, p])]) for p, q in factors]
    expected = torch.kron(torch.kron(mats[0], mats[1]), mats[2])
    assert max_err(m.res_map(logits), expected) < FP32_TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", LOGIT_SCALES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_spectral_norm_one_and_fixes_ones(n: int, scale: float, dtype: torch.dtype) -> None:
    m = create("spectral", n)
    h = m.res_map(random_logits(m, scale, dtype))
    assert max_err(torch.linalg.matrix_norm(h, ord=2), 1.0) < FP32_TOL
    assert max_err(h.sum(-1), 1.0) < FP32_TOL  # H 1 = 1
    assert max_err(h.sum(-2), 1.0) < FP32_TOL  # 1^T H = 1^T


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", LOGIT_SCALES)
@pytest.mark.parametrize(
    ("name", "n", "opts"),
    cases(
        [
            ("stiefel", 2, {}),
            ("stiefel", 4, {}),
            ("stiefel", 5, {}),
            ("grassmann", 4, {"rank": 1}),
            ("grassmann", 4, {"rank": 2}),
            ("grassmann", 5, {"rank": 3}),
            ("grassmann", 8, {"rank": 2}),
        ]
    ),
)
def test_orthogonal(
    name: str, n: int, opts: dict[str, Any], scale: float, dtype: torch.dtype
) -> None:
    m = create(name, n, **opts)
    logits = random_logits(m, scale, dtype)
    h = m.res_map(logits)
    assert max_err(h.transpose(-2, -1) @ h, eye(n)) < cayley_tol(logits)
    assert max_err(torch.linalg.det(h), 1.0) < n * cayley_tol(logits)  # SO(n), not O(n)


@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize(("n", "rank"), [(4, 1), (4, 2), (5, 3), (8, 2)])
def test_grassmann_is_identity_off_its_subspace(n: int, rank: int, scale: float) -> None:
    # H = I + U (R - I) U^T fixes every v orthogonal to span(U): at most `rank` singular
    # values of H - I are non-zero.
    m = create("grassmann", n, rank=rank)
    logits = random_logits(m, scale, torch.float32)
    singular = torch.linalg.svdvals(m.res_map(logits) - eye(n))
    assert singular[..., rank:].abs().max().item() < cayley_tol(logits)
    if rank > 1:  # rank 1 is SO(1) = {1}: always the identity
        assert singular[..., 0].min().item() > 1e-3


def test_grassmann_full_rank_is_stiefel() -> None:
    g, s = create("grassmann", 4, rank=4), create("stiefel", 4)
    logits = random_logits(s, 1.0, torch.float32)
    assert max_err(g.res_map(logits), s.res_map(logits)) < FP32_TOL


def test_hc_res_is_transposed_a_r_and_column_i_comes_from_stream_i() -> None:
    n, channels = 3, 8
    m = create("hc", n)
    gen = torch.Generator().manual_seed(1)
    a_r = torch.randn(n, n, generator=gen)
    assert torch.equal(m.res_map(a_r.flatten()), a_r.T)
    phi = torch.randn(m.phi_shape(channels), generator=gen)
    alpha, bias = torch.ones(3), m.init_bias(0)
    x = torch.randn(n, 5, channels, generator=gen)
    before = m.coefficients(x, phi, alpha, bias)
    x[0] += 1.0
    after = m.coefficients(x, phi, alpha, bias)
    changed = [(b - a).abs() > 0 for a, b in zip(before, after, strict=True)]
    assert changed[0][:, 0].all() and not changed[0][:, 1:].any()  # H_pre[0] only
    assert changed[1][:, 0].all() and not changed[1][:, 1:].any()  # H_post[0] only
    assert changed[2][:, :, 0].all() and not changed[2][:, :, 1:].any()  # column 0 of H_res


# ------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(("name", "n", "opts"), cases(CASES, SMALL_CASES))
def test_res_map_gradcheck(name: str, n: int, opts: dict[str, Any]) -> None:
    m = create(name, n, **opts)
    logits = random_logits(m, 1.0, torch.float64, batch=3).requires_grad_()
    assert torch.autograd.gradcheck(m.res_map, (logits,))


def coeffs_inputs(m: Manifold, channels: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(2)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    x = rand(m.streams, 2, channels)
    phi = 0.3 * rand(*m.phi_shape(channels))
    alpha = rand(3)
    # Not the init bias: Sinkhorn needs thousands of iterations to converge from the
    # near-identity logits, and the implicit gradient is only exact at convergence.
    bias = rand(m.num_logits)
    return x, phi, alpha, bias


@pytest.mark.parametrize(("name", "n", "opts"), cases(CASES))
def test_coeffs_op_gradcheck(name: str, n: int, opts: dict[str, Any]) -> None:
    m = create(name, n, **opts)
    inputs = tuple(t.requires_grad_() for t in coeffs_inputs(m))

    def op(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor) -> tuple[Tensor, ...]:
        return torch.ops.hcpass.coeffs(x, phi, alpha, bias, m.spec())

    # fast_mode checks random projections of the Jacobian: the full one is res_map's job.
    assert torch.autograd.gradcheck(op, inputs, fast_mode=True)


@pytest.mark.parametrize("name", ["hc", "stiefel"])
def test_coeffs_op_gradcheck_static(name: str) -> None:
    m = create(name, 4, dynamic=False)
    x, _, _, bias = coeffs_inputs(m)
    op = lambda bias: torch.ops.hcpass.coeffs(x, None, None, bias, m.spec())
    assert torch.autograd.gradcheck(op, (bias.requires_grad_(),))


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize(("name", "n", "opts"), cases(CASES, SMALL_CASES))
def test_coefficients_backward_matches_vjp(
    name: str, n: int, opts: dict[str, Any], dynamic: bool
) -> None:
    # The closed-form backward (sigmoid maps, RMS-norm + projection, res_map_backward)
    # against torch.func.vjp of the forward, fp64.
    m = create(name, n, dynamic=dynamic, **opts)
    x, phi, alpha, bias = coeffs_inputs(m)
    if not dynamic:
        phi = alpha = None
    gen = torch.Generator().manual_seed(4)
    grads = [
        torch.randn(t.shape, generator=gen, dtype=torch.float64)
        for t in m.coefficients(x, phi, alpha, bias)
    ]
    analytic = m.coefficients_backward(*grads, x, phi, alpha, bias)
    expected = m._coefficients_vjp(*grads, x, phi, alpha, bias)
    for got, want in zip(analytic, expected, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("name", "n", "opts"), cases(CASES, SMALL_CASES))
def test_res_map_backward_matches_vjp(name: str, n: int, opts: dict[str, Any]) -> None:
    m = create(name, n, **opts)
    logits = random_logits(m, 1.0, torch.float64, batch=8)
    grad = torch.randn(8, n, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, vjp = torch.func.vjp(m.res_map, logits)
    torch.testing.assert_close(m.res_map_backward(logits, grad), vjp(grad)[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("name", "n", "opts"), cases(CASES, SMALL_CASES))
def test_res_map_traces_with_fake_tensors(name: str, n: int, opts: dict[str, Any]) -> None:
    """backend="hcpass" inlines res_map into AOTAutograd's fake-tensor trace. Its constants
    (bases, permutation matrices) must be computed in the graph: a cached real tensor fails
    in a fake trace, a tensor constant (``torch.tensor``) is a get_attr that torch 2.13's
    Inductor does not pass into a shared subgraph, and tracing must not leave a fake tensor
    in the eager cache (hcpass.manifolds._constants)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from hcpass.manifolds._constants import _cached

    m = create(name, n, **opts)
    logits = random_logits(m, 1.0, torch.float32, batch=8)
    _cached.cache_clear()  # trace first, then run eagerly
    graph = make_fx(lambda t: m.res_map(t), tracing_mode="fake")(logits)
    assert [node.target for node in graph.graph.nodes if node.op == "get_attr"] == []
    want = m.res_map(logits)
    torch.testing.assert_close(graph(logits), want, rtol=0, atol=0)
    # and eagerly first, then traced: the cached tensors stay out of the trace
    make_fx(lambda t, g: m.res_map_backward(t, g), tracing_mode="fake")(logits, want)


# ------------------------------------------------------------ function preservation
@pytest.mark.parametrize("init", ["identity", "paper"])
@pytest.mark.parametrize(("name", "n", "opts"), cases(CASES, SMALL_CASES))
def test_init_bias_and_phi_shapes(name: str, n: int, opts: dict[str, Any], init: str) -> None:
    m = create(name, n, init=init, **opts)
    bias = m.init_bias(chain_position=7)
    assert bias.shape == (m.num_logits,) and bias.isfinite().all()
    x = torch.randn(n, 3, 8)
    outs = m.coefficients(x, torch.zeros(m.phi_shape(8)), m.init_alpha(), bias)
    assert [t.shape for t in outs] == [(3, n), (3, n), (3, n, n)]
    if name == "hc":  # the paper's init already preserves the function: both are the same
        assert torch.equal(bias, create(name, n, **opts).init_bias(chain_position=7))


@pytest.mark.parametrize("init", ["identity", "identity-copies", "identity-sharp"])
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize(("name", "n", "opts"), cases(CASES, SMALL_CASES))
def test_identity_init_preserves_function(
    name: str, n: int, opts: dict[str, Any], dynamic: bool, init: str
) -> None:
    """Every function-preserving init keeps the mean of the streams the original stream:
    from copies, and (default init, where H_pre reads the mean and H_res keeps it) from
    streams that already differ. The copies inits keep copies copies."""
    channels = 16
    mixer = Mixer(create(name, n, dynamic=dynamic, init=init, **opts), channels, chain_position=5)
    gen = torch.Generator().manual_seed(3)
    copy = torch.randn(2, 3, channels, generator=gen)
    y = torch.randn(2, 3, channels, generator=gen)
    spread = torch.randn(n, 2, 3, channels, generator=gen)
    starts = [copy.expand(n, *copy.shape).clone()]
    if init == "identity" and name != "hc":  # hc keeps the paper's init: copies only
        starts.append(copy + spread - spread.mean(0))  # mean `copy`, streams unequal
    for x in starts:
        with torch.no_grad():
            h_pre, h_post, h_res = torch.ops.hcpass.coeffs(
                x, mixer.phi, mixer.alpha, mixer.bias, mixer.spec
            )
            u = torch.ops.hcpass.pre(x, h_pre)
            out = torch.ops.hcpass.post_res(x, y, h_post, h_res)
        assert max_err(u, copy) < FP32_TOL * x.abs().max().item()
        assert max_err(out.mean(0), copy + y) < FP32_TOL * out.abs().max().item()
        if init != "identity" or name == "hc" or n == 1:
            expected = (copy + y).expand(n, *copy.shape)
            assert max_err(out, expected) < FP32_TOL * expected.abs().max().item()
        else:  # the default init's H_post differs across streams: they diverge at once
            assert max_err(out, (copy + y).expand(n, *copy.shape)) > 0.1


def test_identity_init_keeps_copies_where_asked() -> None:
    """``keep_copies`` (a chain with a post-norm/activation on every stream) and a map whose
    init H_res does not keep the mean give the copies init."""
    m = create("sinkhorn", 4)
    copies = create("sinkhorn", 4, init="identity-copies")
    assert torch.equal(m.init_bias(2, keep_copies=True), copies.init_bias(2))
    h_pre, h_post, _ = (t for t in m.split(m.init_bias(2)))
    torch.testing.assert_close(torch.sigmoid(h_pre), torch.full((4,), 0.25))
    post = 2 * torch.sigmoid(h_post)
    torch.testing.assert_close(post.mean(), torch.tensor(1.0))
    assert post.argmax() == 2 and post.max() - post.min() > 0.5

    class RowsOnly(type(m)):  # rows sum to 1, columns do not
        def res_map(self, logits: torch.Tensor) -> torch.Tensor:
            return torch.softmax(logits.unflatten(-1, (4, 4)), -1)

        def res_init_bias(self) -> torch.Tensor:
            return torch.arange(16.0) / 16

    rows = RowsOnly(4)
    assert torch.equal(rows.split(rows.init_bias(2))[1], torch.zeros(4))


@pytest.mark.parametrize(("name", "n", "opts"), cases(CASES))
def test_default_init_mixes_where_rows_sum_to_one(name: str, n: int, opts: dict[str, Any]) -> None:
    """The default H_res is off the identity (diagonal MIXED_DIAGONAL) wherever its rows sum
    to 1, so its map is not saturated; identity-sharp keeps the near-identity bias."""
    m = create(name, n, **opts)
    h_res = m.res_map(m.split(m.init_bias(0))[2])
    sharp = create(name, n, init="identity-sharp", **opts)
    torch.testing.assert_close(sharp.split(sharp.init_bias(0))[2], sharp.res_identity_bias())
    if name in ("hc", "stiefel", "grassmann"):  # H_res = I is what keeps their rows summing to 1
        torch.testing.assert_close(h_res, torch.eye(n))
    else:
        torch.testing.assert_close(h_res.diagonal(), torch.full((n,), MIXED_DIAGONAL))
        torch.testing.assert_close(h_res.sum(-1), torch.ones(n))


def test_bf16_streams_give_finite_fp32_coefficients() -> None:
    for name, n, opts in CASES:
        mixer = Mixer(create(name, n, **opts), 8, chain_position=0)
        x = (torch.randn(n, 4, 8) * 1e3).bfloat16()
        with torch.no_grad():
            outs = torch.ops.hcpass.coeffs(x, mixer.phi + 1.0, mixer.alpha, mixer.bias, mixer.spec)
        assert all(t.dtype == torch.float32 and t.isfinite().all() for t in outs), name


# ------------------------------------------------------------ Sinkhorn implicit backward
def sinkhorn_pair(iters: int) -> tuple[Manifold, Manifold]:
    return (
        create("sinkhorn", 4, sinkhorn_iters=iters),
        create("sinkhorn", 4, sinkhorn_iters=iters, sinkhorn_backward="implicit"),
    )


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_sinkhorn_implicit_matches_unrolled_at_convergence(dtype: torch.dtype, tol: float) -> None:
    unrolled, implicit = sinkhorn_pair(200)
    logits = random_logits(unrolled, 1.0, dtype, batch=32).requires_grad_()
    weight = torch.randn(32, 4, 4, dtype=dtype, generator=torch.Generator().manual_seed(4))
    grads = [
        torch.autograd.grad((m.res_map(logits) * weight).sum(), logits)[0]
        for m in (unrolled, implicit)
    ]
    assert max_err(grads[0], grads[1]) < tol
    # The same through torch.func (what the op's backward uses), plain and vmapped.
    _, vjp = torch.func.vjp(implicit.res_map, logits.detach())
    assert max_err(vjp(weight)[0], grads[1]) < tol
    per_row = torch.func.vmap(lambda lg, w: torch.func.vjp(implicit.res_map, lg)[1](w)[0])
    assert max_err(per_row(logits.detach(), weight), grads[1]) < tol


def test_sinkhorn_implicit_gradient_finite_for_saturated_logits() -> None:
    _, implicit = sinkhorn_pair(20)
    for dtype in DTYPES:
        logits = random_logits(implicit, 1e4, dtype).requires_grad_()
        (grad,) = torch.autograd.grad((implicit.res_map(logits) ** 2).sum(), logits)
        assert grad.dtype == dtype and grad.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clamped", [False, True], ids=["unclamped", "clamped"])
def test_sinkhorn_vjp_drops_the_clamp_masks_only_where_none_clamped(
    dtype: torch.dtype, clamped: bool
) -> None:
    """With check_clamps (the op's backward where sinkhorn.cpp does not run) the vjp checks
    once whether any row or column sum fell below eps and builds the clamp's gradient masks
    only then; it equals the always-masked vjp bit for bit. Clamped: a column of logits 80
    below the rest sums to ~1e-34 < eps at the first step, where the mask drops the sum's
    share of the gradient (finite here)."""
    logits = random_logits(create("sinkhorn", 4), 1.0, dtype, batch=16).unflatten(-1, (4, 4))
    if clamped:
        logits[::2, :, 0] -= 80.0
    grad = torch.randn(logits.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    first_sums = torch.exp(logits - logits.amax((-2, -1), keepdim=True)).sum(-2)
    assert bool((first_sums < 1e-30).any()) == clamped
    masked = sinkhorn_vjp(logits, grad, 20)
    assert masked.isfinite().all()
    torch.testing.assert_close(
        sinkhorn_vjp(logits, grad, 20, check_clamps=True), masked, rtol=0, atol=0
    )


# fp32 tolerance of a saturated case's gradient (|dlogits| < 1): the fp32 forward of these
# inputs matches fp64 to ~2e-7 and the log-domain backward to ~2e-7.
SATURATED_ATOL = 1e-5


@pytest.mark.parametrize("n", range(2, 9))
def test_sinkhorn_vjp_is_finite_and_exact_for_saturated_logits(n: int) -> None:
    """Logits spanning +-100 (exact zeros after exp, sums below eps at the first steps): the
    unrolled vjp matches fp64 autograd of the unrolled forward, with and without the clamp
    masks check. Stepping back by dividing dL/dm by the sums overflowed fp32 here."""
    logits, grad = saturated_sinkhorn_inputs(n, 256, seed=n)
    h, want = sinkhorn_fp64_reference(logits, grad, 20)
    torch.testing.assert_close(sinkhorn(logits, 20).double(), h, rtol=0, atol=SATURATED_ATOL)
    for check_clamps in (False, True):
        got = sinkhorn_vjp(logits, grad, 20, check_clamps=check_clamps)
        assert got.dtype == torch.float32 and got.isfinite().all()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=SATURATED_ATOL)


def saved_bytes(fn: Callable[[Tensor], Tensor], logits: Tensor) -> int:
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(logits.detach().requires_grad_())
    return total


def test_sinkhorn_saves_constant_memory_whatever_the_iterations() -> None:
    """Neither backward keeps the iterations: the implicit one saves the output P, the
    unrolled one the logits (its backward runs the iterations again); n^2 fp32 per position."""
    logits = random_logits(create("sinkhorn", 4), 1.0, torch.float32, batch=128)
    few, many = sinkhorn_pair(5), sinkhorn_pair(50)
    unrolled = [saved_bytes(pair[0].res_map, logits) for pair in (few, many)]
    implicit = [saved_bytes(pair[1].res_map, logits) for pair in (few, many)]
    assert implicit[0] == implicit[1] == unrolled[0] == unrolled[1] == 128 * 16 * 4


# ----------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("name", "n", "opts", "message"),
    [
        ("kronecker", 3, {}, r"power of 2"),
        ("kromhc", 6, {}, r"power of 2"),
        ("permutation", 9, {}, r"streams <= 8.*n! = 362880"),
        ("grassmann", 4, {"rank": 0}, r"1 <= rank <= streams \(4\)"),
        ("grassmann", 4, {"rank": 5}, r"1 <= rank <= streams \(4\)"),
        ("grassmann", 4, {"rank": 2.0}, r"integer with 1 <= rank"),
        ("grassmann", 1, {"rank": 2}, r"1 <= rank <= streams \(1\)"),
        ("spectral", 4, {"gamma": 0.0}, r"gamma must be a finite number > 0"),
        ("spectral", 4, {"gamma": math.inf}, r"gamma must be a finite number > 0"),
        ("sinkhorn", 4, {"sinkhorn_backward": "adjoint"}, r"one of \('unrolled', 'implicit'\)"),
        ("sinkhorn", 4, {"sinkhorn_iters": 0}, r"sinkhorn_iters must be an integer >= 1"),
        ("stiefel", 4, {"rank": 2}, r"unknown option\(s\) \['rank'\]"),
        ("hc", 0, {}, r"streams must be an integer >= 1"),
        ("sinkhorn", 4, {"alpha": 0.0}, r"alpha = 0 with dynamic=True .* dynamic=False"),
    ],
)
def test_bad_options_raise(name: str, n: int, opts: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create(name, n, **opts)


def test_alpha_zero_is_a_valid_static_mixer_and_a_negative_one_learns() -> None:
    assert create("sinkhorn", 4, dynamic=False, alpha=0.0).alpha == 0.0
    # phi starts at zero; a nonzero alpha of either sign gives it a gradient.
    m = create("sinkhorn", 4, alpha=-0.01)
    x, phi, alpha, bias = coeffs_inputs(m)
    phi = torch.zeros_like(phi).requires_grad_()
    h_pre, h_post, h_res = m.coefficients(x, phi, m.init_alpha(), bias)
    (h_pre.square().sum() + h_post.sum() + h_res[..., 0, 1].sum()).backward()
    assert phi.grad.abs().max() > 0


def test_unknown_manifold_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown manifold 'birkhoff'") as info:
        create("birkhoff", 4)
    for name in (
        "hc",
        "sinkhorn",
        "permutation",
        "kronecker",
        "spectral",
        "stiefel",
        "grassmann",
        "mhc-lite",
    ):
        assert name in str(info.value)


# ------------------------------------------------------------------ extension example
@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Register into copies of the registry so the example does not outlive the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    yield
    resolve.cache_clear()


def test_extending_example(scratch_registry: None) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "extending.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/extending.md", "exec"), namespace)

    assert "lazy-mean (lazy)" in available()
    with pytest.raises(ValueError, match="max_mix must be in"):
        create("lazy", 4, max_mix=2.0)
    m = create("lazy", 4, max_mix=0.5)
    assert isinstance(m, namespace["LazyMean"])
    assert max_err(m.res_map(m.res_identity_bias()).sum(-1), 1.0) < FP32_TOL
    mixer = Mixer(m, 8, chain_position=0)
    with torch.no_grad():
        mixer.phi.normal_()
    x = torch.randn(4, 2, 8)
    _, _, h_res = torch.ops.hcpass.coeffs(x, mixer.phi, mixer.alpha, mixer.bias, mixer.spec)
    assert h_res.shape == (2, 4, 4)
    assert max_err(h_res.sum(-1), 1.0) < FP32_TOL and max_err(h_res.sum(-2), 1.0) < FP32_TOL
    (h_res * torch.randn(2, 4, 4)).sum().backward()
    for param in (mixer.phi, mixer.alpha, mixer.bias):
        assert param.grad is not None and param.grad.isfinite().all() and param.grad.any()


def test_the_spec_leaves_out_the_init():
    """Two models of one class converted with different inits run the same graphs."""
    specs = {create("sinkhorn", 4, init=init, alpha=a).spec() for init in INITS for a in (0.01, 1)}
    assert len(specs) == 1
    assert create("sinkhorn", 4, sinkhorn_iters=5).spec() not in specs
