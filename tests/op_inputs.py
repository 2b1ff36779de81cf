"""Inputs of the hcpass ops for tests: random, with coefficients in their usual ranges."""

from __future__ import annotations

import math

import torch

from hcpass.manifolds import create

# Every hcpass op; the CUDA path registers a generated kernel for each.
OP_NAMES = (
    "coeffs",
    "coeffs_backward",
    "pre",
    "pre_backward",
    "post_res",
    "post_res_backward",
    "post_res_coeffs_pre",
)


def stream_inputs(op: str, n: int, pos: tuple[int, ...], C: int, dtype: torch.dtype) -> tuple:
    torch.manual_seed(0)
    x = torch.randn(n, *pos, C, dtype=dtype)
    y = torch.randn(*pos, C, dtype=dtype)
    coeff = torch.float64 if dtype == torch.float64 else torch.float32
    h_pre = torch.rand(*pos, n, dtype=coeff)
    h_post = 2 * torch.rand(*pos, n, dtype=coeff)
    h_res = torch.rand(*pos, n, n, dtype=coeff)
    return {
        "pre": (x, h_pre),
        "pre_backward": (y, x, h_pre),
        "post_res": (x, y, h_post, h_res),
        "post_res_backward": (torch.randn_like(x), x, y, h_post, h_res),
    }[op]


def coeffs_inputs(
    name: str, n: int, pos: tuple[int, ...], C: int, dtype: torch.dtype, options: dict
) -> tuple:
    """(x, phi, alpha, bias, spec) with a projection large enough to move every logit."""
    torch.manual_seed(0)
    m = create(name, n, **options)
    params = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(n, *pos, C, dtype=dtype)
    bias = (m.init_bias(1) + 0.5 * torch.randn(m.num_logits)).to(params)
    if not m.dynamic:
        return x, None, None, bias, m.spec()
    shape = m.phi_shape(C)
    phi = (torch.randn(shape) / math.sqrt(shape[0])).to(params)
    alpha = (0.5 + torch.rand(m.init_alpha().shape)).to(params)
    return x, phi, alpha, bias, m.spec()


def boundary_inputs(
    n: int,
    pos: tuple[int, ...],
    C: int,
    dtype: torch.dtype,
    options: dict,
    manifold: str = "sinkhorn",
) -> tuple:
    """(x, y, h_post, h_res, phi, alpha, bias, spec) of a site boundary."""
    x, phi, alpha, bias, spec = coeffs_inputs(manifold, n, pos, C, dtype, options)
    _, y, h_post, h_res = stream_inputs("post_res", n, pos, C, dtype)
    # H_res as a merge uses it: rows summing to ~1 keep X' at x's scale
    return x, y, h_post, h_res / h_res.sum(-1, keepdim=True), phi, alpha, bias, spec


def saturated_sinkhorn_inputs(n: int, positions: int, seed: int) -> tuple[torch.Tensor, ...]:
    """fp32 ``[positions, n, n]`` logits uniform in [-100, 100] and an N(0, 1) gradient of H:
    the saturated H_res of a long run (entries of 1e-17 and exact zeros next to 1). About
    40% of exp(logits - max) underflows to exact zeros in fp32, and rows or columns whose
    entries all lie far below the max sum under eps = 1e-30 at the first steps."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.rand(positions, n, n, generator=gen) * 200 - 100
    return logits, torch.randn(positions, n, n, generator=gen)


def sinkhorn_fp64_reference(
    logits: torch.Tensor, grad: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, dL/dlogits) of `sinkhorn` by fp64 autograd of the unrolled forward, from the same
    ``m_0 = exp(logits - max)`` as the fp32 forward computes (its exact zeros and denormals:
    saturated H depends on them). Written on log m, ``log m -= max(logsumexp, log eps)`` per
    step, the same map as ``m /= max(sum, eps)``, because autograd of the division form
    overflows even fp64 here (one factor 1e30 per clamped step). Exact zeros of m_0 enter as
    log m = -1e4 (exp is 0 in fp64 too)."""
    m0 = torch.exp(logits - logits.amax((-2, -1), keepdim=True)).double()
    log_m0 = torch.where(m0 > 0, m0, 1.0).log().masked_fill(m0 == 0, -1e4).requires_grad_()
    log_m, floor = log_m0, math.log(1e-30)
    for step in range(2 * iters):
        log_m = log_m - torch.logsumexp(log_m, -2 + step % 2, keepdim=True).clamp_min(floor)
    h = log_m.exp()
    (dlogits,) = torch.autograd.grad(h, log_m0, grad.double())
    return h.detach(), dlogits
