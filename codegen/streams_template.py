"""Template of the stream kernels: apply H_pre, apply H_res and H_post with the residual
merge, and their backward. Loaded by `generate.py` like the coefficient template: the
shared helpers of `jit_helpers.py` are spliced in, no epilogue (see there why).

Every kernel holds the n streams of a ``[BLOCK_P, BLOCK_C]`` tile at once as a
``[NP, BLOCK_P, BLOCK_C]`` tile (NP = n padded to a power of two), so each stream element
is read once and written once per kernel; coefficients are read as ``[NP, BLOCK_P]``.
The backward kernels reduce over C inside one program (grid over positions only), so the
coefficient gradients need no cross-program reduction.
"""

import triton
import triton.language as tl

# >>> SHARED (generate.py replaces this import with the definitions in jit_helpers.py)
from .jit_helpers import merge_streams

# <<< SHARED


@triton.jit
def pre_fwd(
    x_ptr,
    h_ptr,
    u_ptr,
    P,
    N: tl.constexpr,
    C: tl.constexpr,
    NP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """u = sum_i H_pre[i] x[i]: reads nC, writes C per position."""
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.arange(0, NP)
    p_ok = p < P
    pc_ok = p_ok[:, None] & (c < C)[None, :]
    h = tl.load(
        h_ptr + p[None, :] * N + s[:, None], mask=(s < N)[:, None] & p_ok[None, :], other=0.0
    ).to(ACC)
    x = tl.load(
        x_ptr + (s[:, None, None] * P + p[None, :, None]) * C + c[None, None, :],
        mask=(s < N)[:, None, None] & pc_ok[None, :, :],
        other=0.0,
    ).to(ACC)
    u = tl.sum(h[:, :, None] * x, axis=0)
    tl.store(u_ptr + p[:, None] * C + c[None, :], u.to(u_ptr.dtype.element_ty), mask=pc_ok)


@triton.jit
def pre_bwd(
    gu_ptr,
    x_ptr,
    h_ptr,
    gx_ptr,
    gh_ptr,
    P,
    N: tl.constexpr,
    C: tl.constexpr,
    NP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dx[i] = H_pre[i] du and dH_pre[i] = <x[i], du>: reads (n+1)C, writes nC."""
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    s = tl.arange(0, NP)
    p_ok = p < P
    sp_ok = (s < N)[:, None] & p_ok[None, :]
    h = tl.load(h_ptr + p[None, :] * N + s[:, None], mask=sp_ok, other=0.0).to(ACC)
    gh = tl.zeros((NP, BLOCK_P), ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        pc_ok = p_ok[:, None] & (c < C)[None, :]
        g = tl.load(gu_ptr + p[:, None] * C + c[None, :], mask=pc_ok, other=0.0).to(ACC)
        spc = (s[:, None, None] * P + p[None, :, None]) * C + c[None, None, :]
        spc_ok = (s < N)[:, None, None] & pc_ok[None, :, :]
        x = tl.load(x_ptr + spc, mask=spc_ok, other=0.0).to(ACC)
        gx = h[:, :, None] * g[None, :, :]
        tl.store(gx_ptr + spc, gx.to(gx_ptr.dtype.element_ty), mask=spc_ok)
        gh += tl.sum(x * g[None, :, :], axis=2)
    tl.store(gh_ptr + p[None, :] * N + s[:, None], gh.to(gh_ptr.dtype.element_ty), mask=sp_ok)


@triton.jit
def post_res_fwd(
    x_ptr,
    y_ptr,
    hpost_ptr,
    hres_ptr,
    out_ptr,
    P,
    N: tl.constexpr,
    C: tl.constexpr,
    NP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """X'[i] = sum_j H_res[i, j] x[j] + H_post[i] y: reads (n+1)C, writes nC (the unfused
    reference materialises the n x n products and reads/writes ~3nC)."""
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.arange(0, NP)
    sp_ok = (s < N)[:, None] & (p < P)[None, :]
    hpost = tl.load(hpost_ptr + p[None, :] * N + s[:, None], mask=sp_ok, other=0.0).to(ACC)
    merge_streams(x_ptr, y_ptr, hres_ptr, hpost, out_ptr, p, c, P, N, C)


@triton.jit
def post_res_bwd(
    g_ptr,
    x_ptr,
    y_ptr,
    hpost_ptr,
    hres_ptr,
    gx_ptr,
    gy_ptr,
    ghpost_ptr,
    ghres_ptr,
    P,
    N: tl.constexpr,
    C: tl.constexpr,
    NP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dx[j] = sum_i H_res[i, j] g[i], dy = sum_i H_post[i] g[i], dH_post[i] = <g[i], y>,
    dH_res[i, j] = <g[i], x[j]>: reads (2n+1)C, writes (n+1)C."""
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    s = tl.arange(0, NP)
    p_ok = p < P
    sp_ok = (s < N)[:, None] & p_ok[None, :]
    hpost = tl.load(hpost_ptr + p[None, :] * N + s[:, None], mask=sp_ok, other=0.0).to(ACC)
    ghpost = tl.zeros((NP, BLOCK_P), ACC)
    ghres = tl.zeros((NP, NP, BLOCK_P), ACC)  # [i, j, position]
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        pc_ok = p_ok[:, None] & (c < C)[None, :]
        g = tl.load(
            g_ptr + (s[:, None, None] * P + p[None, :, None]) * C + c[None, None, :],
            mask=(s < N)[:, None, None] & pc_ok[None, :, :],
            other=0.0,
        ).to(ACC)
        y = tl.load(y_ptr + p[:, None] * C + c[None, :], mask=pc_ok, other=0.0).to(ACC)
        gy = tl.sum(hpost[:, :, None] * g, axis=0)
        tl.store(gy_ptr + p[:, None] * C + c[None, :], gy.to(gy_ptr.dtype.element_ty), mask=pc_ok)
        ghpost += tl.sum(g * y[None, :, :], axis=2)
        for j in range(N):
            xjc = (j * P + p[:, None]) * C + c[None, :]
            xj = tl.load(x_ptr + xjc, mask=pc_ok, other=0.0).to(ACC)
            hj = tl.load(
                hres_ptr + p[None, :] * (N * N) + s[:, None] * N + j, mask=sp_ok, other=0.0
            ).to(ACC)
            gxj = tl.sum(hj[:, :, None] * g, axis=0)
            tl.store(gx_ptr + xjc, gxj.to(gx_ptr.dtype.element_ty), mask=pc_ok)
            # a register tile cannot be indexed by j: place column j by a one-hot select
            ghres += tl.where(
                s[None, :, None] == j, tl.sum(g * xj[None, :, :], axis=2)[:, None, :], 0.0
            )
    tl.store(
        ghpost_ptr + p[None, :] * N + s[:, None], ghpost.to(ghpost_ptr.dtype.element_ty), mask=sp_ok
    )
    ij = p[None, None, :] * (N * N) + s[:, None, None] * N + s[None, :, None]
    tl.store(
        ghres_ptr + ij,
        ghres.to(ghres_ptr.dtype.element_ty),
        mask=(s < N)[:, None, None] & (s < N)[None, :, None] & p_ok[None, None, :],
    )
