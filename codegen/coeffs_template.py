"""Template of the coefficient kernels: forward, and the two passes of the backward.

`generate.py` reads this file as text, replaces the block between the ``EPILOGUE`` markers
with the manifold's `Manifold.triton_res_map()` source and the one between the ``SHARED``
markers with the helpers of `jit_helpers.py`, and loads the result as a kernel module. It is
plain Python so that it is linted and read like code; never import it to run kernels (its
placeholder epilogue refuses to compile).

The logits ``alpha * (vec(x) @ phi) / rms(vec(x)) + bias`` are computed in steps that the
kernels call in turn: `_project` (one pass over x: the projections divided by rms, and rms),
`_alpha` and `_logits`; the site-boundary kernel, which projects its merged X' itself,
shares `_load_phi` and `_normalise` with `_project`.

Layouts. x is stream-major ``[N, P, C]``; phi ``[N * C, K]`` with K = 2N + R logit columns
(pre | post | res). Per block of BLOCK_P positions the projection is three tl.dot
accumulators, one per logit group, because Triton cannot slice a register tile by columns:
pre and post ``[BLOCK_P, W]`` (W >= 16 for tl.dot, column k < N valid) and res
``[BLOCK_P, RW]``. With an epilogue of the square layout (SQUARE) the res tile is the padded
square ``RW = S * S`` (column ``i * S + j`` holds logit ``i * N + j``) that reshapes to
``[BLOCK_P, S, S]``; otherwise it is flat (column r holds logit r < R), which is what a flat
epilogue receives and what the kernels return without an epilogue (FUSED false).
"""

import triton
import triton.language as tl

# >>> SHARED (generate.py replaces this import with the definitions in jit_helpers.py)
from .jit_helpers import merge_streams

# <<< SHARED

# >>> EPILOGUE (replaced by generate.py)


@triton.jit
def res_map(logits, N: tl.constexpr, S: tl.constexpr):
    tl.static_assert(False, "placeholder: generate.py splices Manifold.triton_res_map() here")
    return logits


@triton.jit
def res_map_vjp(logits, grad, N: tl.constexpr, S: tl.constexpr):
    tl.static_assert(False, "placeholder: generate.py splices Manifold.triton_res_map() here")
    return grad


# <<< EPILOGUE


@triton.jit
def _res_columns(
    N: tl.constexpr, R: tl.constexpr, S: tl.constexpr, RW: tl.constexpr, SQUARE: tl.constexpr
):
    """phi column and validity of each column of the res tile (see the module docstring)."""
    r = tl.arange(0, RW)
    if SQUARE:
        i = r // S
        j = r % S
        col = 2 * N + i * N + j
        ok = (i < N) & (j < N)
    else:
        col = 2 * N + r
        ok = r < R
    return col, ok


@triton.jit
def _load_phi(rows, rows_ok, res_col, res_ok, N: tl.constexpr, W: tl.constexpr, ACC: tl.constexpr):
    """phi's pre, post and res tiles (``[..., W]``, ``[..., W]``, ``[..., RW]``) of the rows
    at `rows`, pointers to the first column of each row with a trailing axis of 1 (masked by
    `rows_ok`, of the same shape)."""
    k = tl.arange(0, W)
    k_ok = k < N
    phi_pre = tl.load(rows + k, mask=rows_ok & k_ok, other=0.0).to(ACC)
    phi_post = tl.load(rows + N + k, mask=rows_ok & k_ok, other=0.0).to(ACC)
    phi_res = tl.load(rows + res_col, mask=rows_ok & res_ok, other=0.0).to(ACC)
    return phi_pre, phi_post, phi_res


@triton.jit
def _project(
    x_ptr,
    phi_ptr,
    p,
    P,
    res_col,
    res_ok,
    N: tl.constexpr,
    C: tl.constexpr,
    K: tl.constexpr,
    W: tl.constexpr,
    HAS_PHI: tl.constexpr,
    EPS: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The normalised projections ``z = vec(x) @ phi / rms(vec(x))`` of positions `p` (pre,
    post and res tiles) and rms, in one pass over x. Without phi: zeros, and rms 1."""
    BLOCK_P: tl.constexpr = p.shape[0]
    RW: tl.constexpr = res_col.shape[0]
    z_pre = tl.zeros((BLOCK_P, W), ACC)
    z_post = tl.zeros((BLOCK_P, W), ACC)
    z_res = tl.zeros((BLOCK_P, RW), ACC)
    sumsq = tl.zeros((BLOCK_P,), ACC)
    if HAS_PHI:
        p_ok = p < P
        for i in range(N):
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                c_ok = c < C
                xt = tl.load(
                    x_ptr + (i * P + p[:, None]) * C + c[None, :],
                    mask=p_ok[:, None] & c_ok[None, :],
                    other=0.0,
                ).to(ACC)
                sumsq += tl.sum(xt * xt, axis=1)
                rows = phi_ptr + (i * C + c)[:, None] * K
                phi_pre, phi_post, phi_res = _load_phi(
                    rows, c_ok[:, None], res_col, res_ok, N, W, ACC
                )
                z_pre += tl.dot(xt, phi_pre, input_precision=DOT, out_dtype=ACC)
                z_post += tl.dot(xt, phi_post, input_precision=DOT, out_dtype=ACC)
                z_res += tl.dot(xt, phi_res, input_precision=DOT, out_dtype=ACC)
    return _normalise(z_pre, z_post, z_res, sumsq, N, C, HAS_PHI, EPS)


@triton.jit
def _normalise(
    z_pre, z_post, z_res, sumsq, N: tl.constexpr, C: tl.constexpr, HAS_PHI: tl.constexpr, EPS
):
    """The raw projections ``vec(x) @ phi`` divided by ``rms = sqrt(sum(vec(x)^2) / (n C)
    + eps)``, and rms (1 without phi)."""
    rms = tl.full(sumsq.shape, 1.0, sumsq.dtype)
    if HAS_PHI:
        # the reference's order: mean of squares, + eps, sqrt; divide after the matmul
        rms = tl.sqrt(sumsq / (N * C) + EPS)
        z_pre = z_pre / rms[:, None]
        z_post = z_post / rms[:, None]
        z_res = z_res / rms[:, None]
    return z_pre, z_post, z_res, rms


@triton.jit
def _alpha(alpha_ptr, HAS_PHI: tl.constexpr, ACC: tl.constexpr):
    """The scales alpha of the pre, post and res logits (0 without phi)."""
    a_pre = tl.full((), 0.0, ACC)
    a_post = tl.full((), 0.0, ACC)
    a_res = tl.full((), 0.0, ACC)
    if HAS_PHI:
        a_pre = tl.load(alpha_ptr).to(ACC)
        a_post = tl.load(alpha_ptr + 1).to(ACC)
        a_res = tl.load(alpha_ptr + 2).to(ACC)
    return a_pre, a_post, a_res


@triton.jit
def _logits(z_pre, z_post, z_res, a_pre, a_post, a_res, bias_ptr, res_col, res_ok, N: tl.constexpr):
    """The logits ``alpha * z + bias`` of the normalised projections z (`_project`), with
    the scales alpha of `_alpha`."""
    ACC: tl.constexpr = z_pre.dtype
    W: tl.constexpr = z_pre.shape[1]
    k = tl.arange(0, W)
    k_ok = k < N
    b_pre = tl.load(bias_ptr + k, mask=k_ok, other=0.0).to(ACC)
    b_post = tl.load(bias_ptr + N + k, mask=k_ok, other=0.0).to(ACC)
    b_res = tl.load(bias_ptr + res_col, mask=res_ok, other=0.0).to(ACC)
    l_pre = a_pre * z_pre + b_pre[None, :]
    l_post = a_post * z_post + b_post[None, :]
    l_res = a_res * z_res + b_res[None, :]
    return l_pre, l_post, l_res


@triton.jit
def _store_coeffs(
    l_pre,
    l_post,
    l_res,
    p,
    P,
    pre_ptr,
    post_ptr,
    res_ptr,
    N: tl.constexpr,
    R: tl.constexpr,
    S: tl.constexpr,
    FUSED: tl.constexpr,
    SQUARE: tl.constexpr,
):
    """Write H_pre = sigmoid, H_post = 2 sigmoid and H_res = the manifold's map of the
    logits (or, unfused, the raw res logits ``[P, R]``, from the flat res tile) of positions
    `p`."""
    BLOCK_P: tl.constexpr = p.shape[0]
    W: tl.constexpr = l_pre.shape[1]
    RW: tl.constexpr = l_res.shape[1]
    p_ok = p < P
    k = tl.arange(0, W)
    nk = p[:, None] * N + k[None, :]
    nk_ok = p_ok[:, None] & (k < N)[None, :]
    tl.store(pre_ptr + nk, tl.sigmoid(l_pre), mask=nk_ok)
    tl.store(post_ptr + nk, 2.0 * tl.sigmoid(l_post), mask=nk_ok)
    if FUSED:
        if SQUARE:
            h = res_map(tl.reshape(l_res, (BLOCK_P, S, S)), N, S)
        else:
            h = res_map(l_res, N, S)
        i = tl.arange(0, S)
        ij = p[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :]
        ij_ok = p_ok[:, None, None] & (i < N)[None, :, None] & (i < N)[None, None, :]
        tl.store(res_ptr + ij, h, mask=ij_ok)
    else:
        r = tl.arange(0, RW)
        tl.store(
            res_ptr + p[:, None] * R + r[None, :], l_res, mask=p_ok[:, None] & (r < R)[None, :]
        )


@triton.jit
def coeffs_fwd(
    x_ptr,
    phi_ptr,
    alpha_ptr,
    bias_ptr,
    pre_ptr,
    post_ptr,
    res_ptr,
    P,
    N: tl.constexpr,
    C: tl.constexpr,
    R: tl.constexpr,
    S: tl.constexpr,
    W: tl.constexpr,
    RW: tl.constexpr,
    HAS_PHI: tl.constexpr,
    FUSED: tl.constexpr,
    SQUARE: tl.constexpr,
    EPS: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """H_pre, H_post and H_res (or, unfused, the raw res logits ``[P, R]``) of BLOCK_P
    positions: one read of their n*C state, 4 * (2n + n^2) bytes written per position."""
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    res_col, res_ok = _res_columns(N, R, S, RW, SQUARE)
    z_pre, z_post, z_res, _ = _project(
        x_ptr, phi_ptr, p, P, res_col, res_ok, N, C, 2 * N + R, W, HAS_PHI, EPS, ACC, DOT, BLOCK_C
    )
    a_pre, a_post, a_res = _alpha(alpha_ptr, HAS_PHI, ACC)
    l_pre, l_post, l_res = _logits(
        z_pre, z_post, z_res, a_pre, a_post, a_res, bias_ptr, res_col, res_ok, N
    )
    _store_coeffs(l_pre, l_post, l_res, p, P, pre_ptr, post_ptr, res_ptr, N, R, S, FUSED, SQUARE)


@triton.jit
def coeffs_bwd_logits(
    x_ptr,
    phi_ptr,
    alpha_ptr,
    bias_ptr,
    gpre_ptr,
    gpost_ptr,
    gres_ptr,
    dz_ptr,
    coef_ptr,
    dalpha_ptr,
    dbias_ptr,
    P,
    N: tl.constexpr,
    C: tl.constexpr,
    R: tl.constexpr,
    S: tl.constexpr,
    W: tl.constexpr,
    RW: tl.constexpr,
    HAS_PHI: tl.constexpr,
    FUSED: tl.constexpr,
    SQUARE: tl.constexpr,
    EPS: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Backward pass 1 of BLOCK_P positions: recompute the logits (one read of x), step
    back through the sigmoids and the res epilogue, and write what pass 2 needs per
    position -- dz = dL/d(vec(x) @ phi) ``[P, K]`` and coef, the factor of x in dL/dx from
    the rms -- plus this block's partial sums of dL/dalpha ``[.., 4]`` and dL/dbias.

    Unfused (FUSED=False), gres holds dL/d(res logits) ``[P, R]``, computed in PyTorch.
    """
    pid = tl.program_id(0)
    K: tl.constexpr = 2 * N + R
    p = (pid * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    p_ok = p < P
    res_col, res_ok = _res_columns(N, R, S, RW, SQUARE)
    z_pre, z_post, z_res, rms = _project(
        x_ptr, phi_ptr, p, P, res_col, res_ok, N, C, K, W, HAS_PHI, EPS, ACC, DOT, BLOCK_C
    )
    a_pre, a_post, a_res = _alpha(alpha_ptr, HAS_PHI, ACC)
    l_pre, l_post, l_res = _logits(
        z_pre, z_post, z_res, a_pre, a_post, a_res, bias_ptr, res_col, res_ok, N
    )
    k = tl.arange(0, W)
    k_ok = k < N
    nk = p[:, None] * N + k[None, :]
    nk_ok = p_ok[:, None] & k_ok[None, :]
    # masked positions load a zero gradient, so they add nothing to the sums below
    s_pre = tl.sigmoid(l_pre)
    g_pre = tl.load(gpre_ptr + nk, mask=nk_ok, other=0.0).to(ACC)
    d_pre = g_pre * (1.0 - s_pre) * s_pre
    s_post = tl.sigmoid(l_post)
    g_post = tl.load(gpost_ptr + nk, mask=nk_ok, other=0.0).to(ACC)
    d_post = 2.0 * g_post * (1.0 - s_post) * s_post
    res_in = p_ok[:, None] & res_ok[None, :]
    if FUSED:
        i = tl.arange(0, S)
        ij = p[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :]
        ij_ok = p_ok[:, None, None] & (i < N)[None, :, None] & (i < N)[None, None, :]
        g_res = tl.load(gres_ptr + ij, mask=ij_ok, other=0.0).to(ACC)
        if SQUARE:
            d_res = res_map_vjp(tl.reshape(l_res, (BLOCK_P, S, S)), g_res, N, S)
        else:
            d_res = res_map_vjp(l_res, g_res, N, S)
        d_res = tl.where(res_in, tl.reshape(d_res, (BLOCK_P, RW)), 0.0)
    else:
        d_res = tl.load(
            gres_ptr + p[:, None] * R + (res_col - 2 * N)[None, :], mask=res_in, other=0.0
        ).to(ACC)
    dbias = dbias_ptr + pid * K
    tl.store(dbias + k, tl.sum(d_pre, axis=0), mask=k_ok)
    tl.store(dbias + N + k, tl.sum(d_post, axis=0), mask=k_ok)
    tl.store(dbias + res_col, tl.sum(d_res, axis=0), mask=res_ok)
    if HAS_PHI:
        tl.store(dalpha_ptr + pid * 4, tl.sum(tl.sum(d_pre * z_pre, axis=1), axis=0))
        tl.store(dalpha_ptr + pid * 4 + 1, tl.sum(tl.sum(d_post * z_post, axis=1), axis=0))
        tl.store(dalpha_ptr + pid * 4 + 2, tl.sum(tl.sum(d_res * z_res, axis=1), axis=0))
        # z = projection / rms: dL/dprojection = alpha * d / rms; the rms term of dL/dx is
        # x * d(rms) / (rms * n * C) with d(rms) = -sum(alpha * d * z) / rms
        d_pre = a_pre * d_pre
        d_post = a_post * d_post
        d_res = a_res * d_res
        dot_z = (
            tl.sum(d_pre * z_pre, axis=1)
            + tl.sum(d_post * z_post, axis=1)
            + tl.sum(d_res * z_res, axis=1)
        )
        tl.store(coef_ptr + p, -dot_z / (rms * rms * (N * C)), mask=p_ok)
        dz = dz_ptr + p[:, None] * K
        tl.store(dz + k[None, :], d_pre / rms[:, None], mask=nk_ok)
        tl.store(dz + N + k[None, :], d_post / rms[:, None], mask=nk_ok)
        tl.store(dz + res_col[None, :], d_res / rms[:, None], mask=res_in)


@triton.jit
def coeffs_bwd_x(
    x_ptr,
    phi_ptr,
    dz_ptr,
    coef_ptr,
    dx_ptr,
    dphi_ptr,
    P,
    SPLIT,
    N: tl.constexpr,
    C: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Backward pass 2, one BLOCK_C slice of stream i (grid axes 0, 1) over every SPLIT-th
    block of positions (axis 2): dx = dz @ phi^T + coef * x, written, and the slice's
    dphi = x^T @ dz summed in registers and written to partial sum `split` (the launcher
    adds the SPLIT partials: a deterministic two-stage reduction, no atomics)."""
    i = tl.program_id(1)
    split = tl.program_id(2)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    k = tl.arange(0, KP)
    k_ok = k < K
    phi_t = tl.load(
        phi_ptr + (i * C + c)[None, :] * K + k[:, None],
        mask=k_ok[:, None] & c_ok[None, :],
        other=0.0,
    ).to(ACC)
    dphi = tl.zeros((BLOCK_C, KP), ACC)
    for block in range(split, tl.cdiv(P, BLOCK_P), SPLIT):
        p = (block * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        p_ok = p < P
        xc = (i * P + p[:, None]) * C + c[None, :]
        xc_ok = p_ok[:, None] & c_ok[None, :]
        xt = tl.load(x_ptr + xc, mask=xc_ok, other=0.0).to(ACC)
        dz = tl.load(
            dz_ptr + p[:, None] * K + k[None, :], mask=p_ok[:, None] & k_ok[None, :], other=0.0
        )
        coef = tl.load(coef_ptr + p, mask=p_ok, other=0.0)
        dx = tl.dot(dz, phi_t, input_precision=DOT, out_dtype=ACC) + coef[:, None] * xt
        tl.store(dx_ptr + xc, dx.to(dx_ptr.dtype.element_ty), mask=xc_ok)
        dphi += tl.dot(tl.trans(xt), dz, input_precision=DOT, out_dtype=ACC)
    tl.store(
        dphi_ptr + (split * N * C + i * C + c)[:, None] * K + k[None, :],
        dphi,
        mask=c_ok[:, None] & k_ok[None, :],
    )


@triton.jit
def post_res_coeffs_pre_fwd(
    x_ptr,
    y_ptr,
    hpost_ptr,
    hres_ptr,
    phi_ptr,
    alpha_ptr,
    bias_ptr,
    out_ptr,
    pre_ptr,
    post_ptr,
    res_ptr,
    u_ptr,
    P,
    N: tl.constexpr,
    C: tl.constexpr,
    R: tl.constexpr,
    S: tl.constexpr,
    W: tl.constexpr,
    RW: tl.constexpr,
    NP: tl.constexpr,
    HAS_PHI: tl.constexpr,
    FUSED: tl.constexpr,
    SQUARE: tl.constexpr,
    EPS: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The boundary between two sites, for BLOCK_P positions: site l's merge
    ``X'[i] = sum_j H_res[i, j] x[j] + H_post[i] y`` (written), site l+1's coefficients of X'
    accumulated from the same registers, then its branch input ``u = sum_i H_pre'[i] X'[i]``
    from a second pass over X' that this program has just written (mostly L2 hits).
    Per position: reads (n+1)C and nC (the re-read), writes nC + C; unfused, post_res, coeffs
    and pre read (3n+1)C from memory.

    The stream tile is ``[NP, BLOCK_P, BLOCK_C]`` (all streams of a slice, as in post_res_fwd);
    the projection is a batched tl.dot against phi's rows of every stream, ``[NP, BLOCK_C, W]``,
    summed over streams at the end. The coefficients see X' rounded to the stream dtype, as
    the unfused coeffs kernel reading it back would.
    """
    tl.static_assert(FUSED, "the fused boundary needs the manifold's Triton H_res epilogue")
    K: tl.constexpr = 2 * N + R
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    p_ok = p < P
    s = tl.arange(0, NP)
    s_ok = s < N
    sp_ok = s_ok[:, None] & p_ok[None, :]
    res_col, res_ok = _res_columns(N, R, S, RW, SQUARE)
    k = tl.arange(0, W)
    hpost = tl.load(hpost_ptr + p[None, :] * N + s[:, None], mask=sp_ok, other=0.0).to(ACC)
    z_pre = tl.zeros((NP, BLOCK_P, W), ACC)
    z_post = tl.zeros((NP, BLOCK_P, W), ACC)
    z_res = tl.zeros((NP, BLOCK_P, RW), ACC)
    sumsq = tl.zeros((BLOCK_P,), ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        out = merge_streams(x_ptr, y_ptr, hres_ptr, hpost, out_ptr, p, c, P, N, C)
        if HAS_PHI:
            xo = out.to(ACC)  # padded streams hold zeros: no H_res or H_post weight reaches them
            sumsq += tl.sum(tl.sum(xo * xo, axis=2), axis=0)
            rows = phi_ptr + (s[:, None] * C + c[None, :])[:, :, None] * K
            sc_ok = (s_ok[:, None] & (c < C)[None, :])[:, :, None]
            phi_pre, phi_post, phi_res = _load_phi(rows, sc_ok, res_col, res_ok, N, W, ACC)
            z_pre += tl.dot(xo, phi_pre, input_precision=DOT, out_dtype=ACC)
            z_post += tl.dot(xo, phi_post, input_precision=DOT, out_dtype=ACC)
            z_res += tl.dot(xo, phi_res, input_precision=DOT, out_dtype=ACC)
    z_pre, z_post, z_res, _ = _normalise(
        tl.sum(z_pre, 0), tl.sum(z_post, 0), tl.sum(z_res, 0), sumsq, N, C, HAS_PHI, EPS
    )
    a_pre, a_post, a_res = _alpha(alpha_ptr, HAS_PHI, ACC)
    l_pre, l_post, l_res = _logits(
        z_pre, z_post, z_res, a_pre, a_post, a_res, bias_ptr, res_col, res_ok, N
    )
    _store_coeffs(l_pre, l_post, l_res, p, P, pre_ptr, post_ptr, res_ptr, N, R, S, FUSED, SQUARE)
    # H_pre' as [stream, position]: column k of the [BLOCK_P, W] tile is stream k
    h_pre = tl.sum(tl.where(k[None, None, :] == s[:, None, None], tl.sigmoid(l_pre)[None], 0.0), 2)
    tl.debug_barrier()  # X' was written by other threads of this program
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        pc_ok = p_ok[:, None] & (c < C)[None, :]
        spc = (s[:, None, None] * P + p[None, :, None]) * C + c[None, None, :]
        xo = tl.load(out_ptr + spc, mask=s_ok[:, None, None] & pc_ok[None, :, :], other=0.0)
        u = tl.sum(h_pre[:, :, None] * xo.to(ACC), axis=0)
        tl.store(u_ptr + p[:, None] * C + c[None, :], u.to(u_ptr.dtype.element_ty), mask=pc_ok)
