"""Triton kernels of the Attention Residuals ops: ``hcpass::attnres`` (as its two phases)
and its backward, and the phases as ops of their own (``attnres_blocks``, ``attnres_merge``
and their backward ops), which the CUDA lowering calls for Block AttnRes.

The math (`hcpass.ops.attnres.reference` derives it): values ``v_i [*pos, C]``, a query
``w [C]``; per position, in compute dtype (fp32; fp64 for fp64 values)::

    s_i = <w, v_i> / sqrt(mean_c v_i^2 + eps),   h = sum_i softmax_i(s)_i v_i

split as in the paper: the k values are n = k - 1 completed blocks and a partial block.

- Phase 1, `attnres_blocks` (kernel `attnres_blocks_kernel`): S queries ``[S, C]`` over the n
  completed blocks. Grid: (position tiles, query tiles); the reads of a block serve all
  the queries of the tile (up to 16: with S <= 16 the blocks are read for all S queries
  together, never per query). Two sweeps:
  sweep 1 goes block by block over the channels, computing each block's logits for the tile
  ``[BLOCK_S, BLOCK_P]`` (RMS and dot products) and, online, ``m = max_j s_j`` and
  ``l = sum_j exp(s_j - m)``, so ``lse = m + log l``; it parks the logits in a small scratch
  ``[n, S, P]`` (n S numbers per position, against n C values). Sweep 2 goes channel
  chunk by channel chunk, over the blocks within each, accumulating
  ``o = sum_j exp(s_j - lse) b_j`` in registers ``[BLOCK_S, BLOCK_P, BLOCK_C]`` and
  writing it once. Outputs o ``[S, *pos, C]`` and lse ``[S, *pos]``, in compute dtype.
  So each block is read twice per position tile (the second time mostly from L2), not
  once: the logits need all channels before any of the output can be weighted, and a
  ``[BLOCK_S, BLOCK_P, C]`` accumulator does not fit in registers for a model's C.
- Phase 2, `attnres_merge` (kernel `attnres_merge_kernel`): one query merges (o, lse) with
  the partial block p: ``s_p = <w, p> / rms(p)``, ``gamma = sigmoid(lse - s_p)``,
  ``h = gamma o + (1 - gamma) p``, in p's dtype.
  Grid: position tiles; the first sweep over the channels reads p for its logit, the second
  reads o and p again and writes h.

`attnres` (the CUDA kernel of ``hcpass::attnres``, `register_cuda_kernels` installs it) is
phase 1 over ``values[:-1]`` with the one query, then phase 2 with ``values[-1]``; k = 1
copies the one value.

- Backward, `attnres_backward` (kernel `attnres_bwd_kernel`, the CUDA kernel of
  ``hcpass::attnres_backward``): the closed form of the reference, recomputed from the
  values. Grid: position tiles. Sweep 1 goes value by value over the channels: ``r_i``,
  ``q_i = <w, v_i>``, ``d_i = <g, v_i>`` (parked in a scratch ``[3, k, P]``) and, online,
  the softmax statistics and ``dbar = sum_j alpha_j d_j``. Sweep 2 goes channel chunk by
  chunk, over the values within each: ``alpha_i``, ``ds_i = alpha_i (d_i - dbar)``,
  ``grad v_i = alpha_i g + ds_i r_i w - ds_i r_i^3 q_i v_i / C``, and the program's partial
  sum of ``grad w = sum_pos sum_i ds_i r_i v_i`` (``[programs, C]``, summed by torch). Reads
  the values and g twice, writes each value's gradient once.
- Backward of phase 2, `attnres_merge_backward` (kernel `attnres_merge_bwd_kernel`): grid:
  position tiles. Sweep 1 over the channels: ``r_p``, ``q_p = <w, p>``, ``e = <g, o - p>``,
  then gamma and ``grad lse = gamma (1 - gamma) e``; sweep 2 writes ``grad o = gamma g``
  (compute dtype), grad p, and the program's partial sum of grad w.
- Backward of phase 1, `attnres_blocks_backward` (kernel `attnres_blocks_bwd_kernel`): grid:
  position tiles, all S queries of a tile in one program (a block's gradient sums over the
  queries, so it is written once, never accumulated across programs). Sweep 1:
  ``D_s = <grad o_s, o_s> - grad lse_s``, then block by block ``r_j``, ``q_sj = <w_s, b_j>``
  and ``d_sj = <grad o_s, b_j>`` (parked in scratch ``[n, P]`` and ``[2, n, S, P]``). Sweep 2,
  channel chunk by chunk over the blocks: ``beta_sj = exp(r_j q_sj - lse_s)``,
  ``ds_sj = beta_sj (d_sj - D_s)``, grad b_j and the program's partial sums of grad w_s
  (``[programs, S, C]``, summed by torch). Reads the saved o once and grad o n + 2 times per
  tile (it is S times a block: the price of never recomputing phase 1's weighted sum).

Layout: the values arrive as a list of separately allocated tensors, any strides. The
blocks reach the kernel as a table ``[n, 3]`` (int64: address, position stride, channel
stride), so there is no stack copy; a block whose positions cannot be flattened to one
stride (a partly expanded multi-dimensional ``*pos``) is copied. The table is a small
host-to-device copy per call (not capturable in a CUDA graph).

Launchers have exactly the signatures of the reference functions. On CUDA tensors they run
compiled kernels; in a process that imported triton with ``TRITON_INTERPRET=1``, the
interpreter on CPU tensors (tests). Block sizes are fixed heuristics, not autotuned: they
have not been measured on a GPU yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from hcpass.manifolds.base import compute_dtype
from hcpass.ops.attnres import reference

from . import generate
from .kernels import _acc, _check_device


def _jit(fn: Callable) -> Callable:
    """``@triton.jit``, in the mode triton's own library was decorated in (compiled or
    interpreted, `generate.interpreted`), whatever TRITON_INTERPRET says now: a kernel only
    works decorated as the ``tl`` functions it calls (see `generate`)."""
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = generate.interpreted()
        return triton.jit(fn)


# ------------------------------------------------------------------------------ kernels
@_jit
def _load_tile(table_ptr, j, first_ptr, p64, c, mask, ACC: tl.constexpr):
    """The ``[BLOCK_P, BLOCK_C]`` tile at positions `p64` and channels `c` of tensor `j` of a
    table (``[n, 3]`` int64: address, position stride, channel stride), in ACC; `first_ptr`
    (tensor 0) types the addresses."""
    base = tl.load(table_ptr + 3 * j).to(first_ptr.dtype, bitcast=True)
    stride_p = tl.load(table_ptr + 3 * j + 1)
    stride_c = tl.load(table_ptr + 3 * j + 2)
    rows = base + p64[:, None] * stride_p + c[None, :] * stride_c
    return tl.load(rows, mask=mask, other=0.0).to(ACC)


@_jit
def attnres_blocks_kernel(
    table_ptr,  # int64 [n, 3]: address, position stride, channel stride of each block
    first_ptr,  # block 0: its pointer type types the table's addresses
    w_ptr,  # [S, C] queries, contiguous
    logits_ptr,  # [n, S, P] scratch, ACC
    o_ptr,  # [S, P, C] out, ACC
    lse_ptr,  # [S, P] out, ACC
    n,
    S,
    P,
    eps,
    C: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    p_ok, s_ok = p < P, s < S
    sp_ok = s_ok[:, None] & p_ok[None, :]
    p64 = p.to(tl.int64)
    sp = s[:, None].to(tl.int64) * P + p64[None, :]  # [BLOCK_S, BLOCK_P] into [S, P]

    # sweep 1: each block's logits and the online-softmax statistics
    m = tl.full((BLOCK_S, BLOCK_P), float("-inf"), ACC)
    l = tl.zeros((BLOCK_S, BLOCK_P), ACC)  # noqa: E741
    for j in range(n):
        sumsq = tl.zeros((BLOCK_P,), ACC)
        dots = tl.zeros((BLOCK_S, BLOCK_P), ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            v = _load_tile(table_ptr, j, first_ptr, p64, c, p_ok[:, None] & c_ok[None, :], ACC)
            w = tl.load(
                w_ptr + s[:, None] * C + c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0
            ).to(ACC)
            sumsq += tl.sum(v * v, 1)
            dots += tl.sum(w[:, None, :] * v[None, :, :], 2)
        r = 1.0 / tl.sqrt(sumsq / C + eps)
        logit = dots * r[None, :]  # padded lanes: 0, finite
        tl.store(logits_ptr + j * S * P + sp, logit, mask=sp_ok)
        top = tl.maximum(m, logit)
        l = l * tl.exp(m - top) + tl.exp(logit - top)  # noqa: E741
        m = top
    lse = m + tl.log(l)
    tl.store(lse_ptr + sp, lse, mask=sp_ok)
    tl.debug_barrier()  # the logits parked by other threads of this program are visible

    # sweep 2: o = sum_j exp(s_j - lse) b_j, one channel chunk at a time
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        o = tl.zeros((BLOCK_S, BLOCK_P, BLOCK_C), ACC)
        for j in range(n):
            logit = tl.load(logits_ptr + j * S * P + sp, mask=sp_ok, other=0.0)
            weight = tl.exp(logit - lse)
            v = _load_tile(table_ptr, j, first_ptr, p64, c, p_ok[:, None] & c_ok[None, :], ACC)
            o += weight[:, :, None] * v[None, :, :]
        tl.store(
            o_ptr + sp[:, :, None] * C + c[None, None, :],
            o,
            mask=sp_ok[:, :, None] & c_ok[None, None, :],
        )


@_jit
def attnres_merge_kernel(
    o_ptr,  # [P, C] ACC, contiguous
    lse_ptr,  # [P] ACC
    x_ptr,  # [P, C] the partial block, strides (stride_p, stride_c)
    w_ptr,  # [C] query
    h_ptr,  # [P, C] out, the partial block's dtype, contiguous
    P,
    stride_p,
    stride_c,
    eps,
    C: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    p64 = p.to(tl.int64)
    sumsq = tl.zeros((BLOCK_P,), ACC)
    dot = tl.zeros((BLOCK_P,), ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        x = tl.load(
            x_ptr + p64[:, None] * stride_p + c[None, :] * stride_c,
            mask=p_ok[:, None] & c_ok[None, :],
            other=0.0,
        ).to(ACC)
        w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)
        sumsq += tl.sum(x * x, 1)
        dot += tl.sum(x * w[None, :], 1)
    logit = dot / tl.sqrt(sumsq / C + eps)
    lse = tl.load(lse_ptr + p64, mask=p_ok, other=0.0).to(ACC)
    gamma = (1.0 / (1.0 + tl.exp(logit - lse)))[:, None]  # sigmoid(lse - s_p)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        pc_ok = p_ok[:, None] & (c < C)[None, :]
        x = tl.load(
            x_ptr + p64[:, None] * stride_p + c[None, :] * stride_c, mask=pc_ok, other=0.0
        ).to(ACC)
        o = tl.load(o_ptr + p64[:, None] * C + c[None, :], mask=pc_ok, other=0.0).to(ACC)
        h = gamma * o + (1.0 - gamma) * x
        tl.store(h_ptr + p64[:, None] * C + c[None, :], h.to(h_ptr.dtype.element_ty), mask=pc_ok)


@_jit
def attnres_bwd_kernel(
    table_ptr,  # int64 [k, 3]: address, position stride, channel stride of each value
    first_ptr,  # value 0: its pointer type types both tables' addresses
    out_table_ptr,  # int64 [k]: addresses of the values' gradients, contiguous [P, C]
    g_ptr,  # [P, C] grad of h, strides (stride_gp, stride_gc)
    w_ptr,  # [C] query, ACC
    stats_ptr,  # [3, k, P] scratch, ACC: r, q, d
    gw_ptr,  # [programs, C] out, ACC: per-program partial sums of grad w
    k,
    P,
    stride_gp,
    stride_gc,
    eps,
    C: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    p64 = p.to(tl.int64)
    g_rows = g_ptr + p64[:, None] * stride_gp

    # sweep 1: r_i, q_i, d_i; online max m, l = sum exp(s - m), ld = sum exp(s - m) d
    m = tl.full((BLOCK_P,), float("-inf"), ACC)
    l = tl.zeros((BLOCK_P,), ACC)  # noqa: E741
    ld = tl.zeros((BLOCK_P,), ACC)
    for i in range(k):
        sumsq = tl.zeros((BLOCK_P,), ACC)
        q = tl.zeros((BLOCK_P,), ACC)
        d = tl.zeros((BLOCK_P,), ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            pc_ok = p_ok[:, None] & c_ok[None, :]
            v = _load_tile(table_ptr, i, first_ptr, p64, c, pc_ok, ACC)
            g = tl.load(g_rows + c[None, :] * stride_gc, mask=pc_ok, other=0.0).to(ACC)
            w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)
            sumsq += tl.sum(v * v, 1)
            q += tl.sum(v * w[None, :], 1)
            d += tl.sum(v * g, 1)
        r = 1.0 / tl.sqrt(sumsq / C + eps)
        tl.store(stats_ptr + i * P + p64, r, mask=p_ok)
        tl.store(stats_ptr + (k + i) * P + p64, q, mask=p_ok)
        tl.store(stats_ptr + (2 * k + i) * P + p64, d, mask=p_ok)
        s = r * q  # padded lanes: 0, finite
        top = tl.maximum(m, s)
        scale = tl.exp(m - top)
        e = tl.exp(s - top)
        l = l * scale + e  # noqa: E741
        ld = ld * scale + e * d
        m = top
    inv_l = 1.0 / l
    dbar = ld * inv_l
    tl.debug_barrier()  # the stats parked by other threads of this program are visible

    # sweep 2: each value's gradient and the partial grad of w, one channel chunk at a time
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        pc_ok = p_ok[:, None] & c_ok[None, :]
        g = tl.load(g_rows + c[None, :] * stride_gc, mask=pc_ok, other=0.0).to(ACC)
        w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)
        gw = tl.zeros((BLOCK_C,), ACC)
        for i in range(k):
            out = tl.load(out_table_ptr + i).to(first_ptr.dtype, bitcast=True)
            r = tl.load(stats_ptr + i * P + p64, mask=p_ok, other=0.0)
            q = tl.load(stats_ptr + (k + i) * P + p64, mask=p_ok, other=0.0)
            d = tl.load(stats_ptr + (2 * k + i) * P + p64, mask=p_ok, other=0.0)
            alpha = tl.exp(r * q - m) * inv_l
            coef_w = alpha * (d - dbar) * r  # ds_i r_i
            coef_v = coef_w * r * r * q / C
            v = _load_tile(table_ptr, i, first_ptr, p64, c, pc_ok, ACC)
            gv = alpha[:, None] * g + coef_w[:, None] * w[None, :] - coef_v[:, None] * v
            tl.store(
                out + p64[:, None] * C + c[None, :], gv.to(first_ptr.dtype.element_ty), mask=pc_ok
            )
            gw += tl.sum(coef_w[:, None] * v, 0)
        tl.store(gw_ptr + pid * C + c, gw, mask=c_ok)


@_jit
def attnres_merge_bwd_kernel(
    g_ptr,  # [P, C] grad of h, strides (stride_gp, stride_gc)
    o_ptr,  # [P, C] ACC, contiguous
    lse_ptr,  # [P] ACC
    x_ptr,  # [P, C] the partial block, strides (stride_p, stride_c)
    w_ptr,  # [C] query, ACC
    go_ptr,  # [P, C] out, ACC: grad o
    glse_ptr,  # [P] out, ACC: grad lse
    gx_ptr,  # [P, C] out, the partial block's dtype, contiguous
    gw_ptr,  # [programs, C] out, ACC: per-program partial sums of grad w
    P,
    stride_p,
    stride_c,
    stride_gp,
    stride_gc,
    eps,
    C: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    p64 = p.to(tl.int64)
    x_rows = x_ptr + p64[:, None] * stride_p
    g_rows = g_ptr + p64[:, None] * stride_gp

    # sweep 1: r_p, q_p = <w, p>, e = <g, o - p>
    sumsq = tl.zeros((BLOCK_P,), ACC)
    q = tl.zeros((BLOCK_P,), ACC)
    e = tl.zeros((BLOCK_P,), ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        pc_ok = p_ok[:, None] & c_ok[None, :]
        x = tl.load(x_rows + c[None, :] * stride_c, mask=pc_ok, other=0.0).to(ACC)
        g = tl.load(g_rows + c[None, :] * stride_gc, mask=pc_ok, other=0.0).to(ACC)
        o = tl.load(o_ptr + p64[:, None] * C + c[None, :], mask=pc_ok, other=0.0).to(ACC)
        w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)
        sumsq += tl.sum(x * x, 1)
        q += tl.sum(x * w[None, :], 1)
        e += tl.sum(g * (o - x), 1)
    r = 1.0 / tl.sqrt(sumsq / C + eps)
    lse = tl.load(lse_ptr + p64, mask=p_ok, other=0.0).to(ACC)
    gamma = 1.0 / (1.0 + tl.exp(r * q - lse))  # sigmoid(lse - s_p)
    slope = gamma * (1.0 - gamma) * e  # grad lse = -ds_p
    tl.store(glse_ptr + p64, slope, mask=p_ok)
    coef_w = -slope * r  # ds_p r_p: padded lanes have e = 0
    coef_x = coef_w * r * r * q / C

    # sweep 2: grad o, grad p and the partial grad of w, one channel chunk at a time
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        pc_ok = p_ok[:, None] & c_ok[None, :]
        x = tl.load(x_rows + c[None, :] * stride_c, mask=pc_ok, other=0.0).to(ACC)
        g = tl.load(g_rows + c[None, :] * stride_gc, mask=pc_ok, other=0.0).to(ACC)
        w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)
        out = p64[:, None] * C + c[None, :]
        tl.store(go_ptr + out, gamma[:, None] * g, mask=pc_ok)
        gx = (1.0 - gamma)[:, None] * g + coef_w[:, None] * w[None, :] - coef_x[:, None] * x
        tl.store(gx_ptr + out, gx.to(gx_ptr.dtype.element_ty), mask=pc_ok)
        tl.store(gw_ptr + pid * C + c, tl.sum(coef_w[:, None] * x, 0), mask=c_ok)


@_jit
def attnres_blocks_bwd_kernel(
    table_ptr,  # int64 [n, 3]: address, position stride, channel stride of each block
    first_ptr,  # block 0: its pointer type types both tables' addresses
    out_table_ptr,  # int64 [n]: addresses of the blocks' gradients, contiguous [P, C]
    w_ptr,  # [S, C] queries, ACC
    go_ptr,  # [S, P, C] grad o, ACC, contiguous
    o_ptr,  # [S, P, C] ACC, contiguous
    lse_ptr,  # [S, P] ACC
    glse_ptr,  # [S, P] grad lse, ACC
    r_ptr,  # [n, P] scratch, ACC
    qd_ptr,  # [2, n, S, P] scratch, ACC: q, d
    gw_ptr,  # [programs, S, C] out, ACC: per-program partial sums of grad w
    n,
    S,
    P,
    eps,
    C: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    s = tl.arange(0, BLOCK_S)
    p_ok, s_ok = p < P, s < S
    sp_ok = s_ok[:, None] & p_ok[None, :]
    p64 = p.to(tl.int64)
    sp = s[:, None].to(tl.int64) * P + p64[None, :]  # [BLOCK_S, BLOCK_P] into [S, P]

    # sweep 1: D_s = <grad o_s, o_s> - grad lse_s, then per block r_j, q_sj, d_sj
    dots = tl.zeros((BLOCK_S, BLOCK_P), ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        spc = sp[:, :, None] * C + c[None, None, :]
        spc_ok = sp_ok[:, :, None] & (c < C)[None, None, :]
        go = tl.load(go_ptr + spc, mask=spc_ok, other=0.0)
        o = tl.load(o_ptr + spc, mask=spc_ok, other=0.0)
        dots += tl.sum(go * o, 2)
    big_d = dots - tl.load(glse_ptr + sp, mask=sp_ok, other=0.0)
    for j in range(n):
        sumsq = tl.zeros((BLOCK_P,), ACC)
        q = tl.zeros((BLOCK_S, BLOCK_P), ACC)
        d = tl.zeros((BLOCK_S, BLOCK_P), ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            b = _load_tile(table_ptr, j, first_ptr, p64, c, p_ok[:, None] & c_ok[None, :], ACC)
            w = tl.load(
                w_ptr + s[:, None] * C + c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0
            )
            go = tl.load(
                go_ptr + sp[:, :, None] * C + c[None, None, :],
                mask=sp_ok[:, :, None] & c_ok[None, None, :],
                other=0.0,
            )
            sumsq += tl.sum(b * b, 1)
            q += tl.sum(w[:, None, :] * b[None, :, :], 2)
            d += tl.sum(go * b[None, :, :], 2)
        tl.store(r_ptr + j * P + p64, 1.0 / tl.sqrt(sumsq / C + eps), mask=p_ok)
        tl.store(qd_ptr + j * S * P + sp, q, mask=sp_ok)
        tl.store(qd_ptr + (n + j) * S * P + sp, d, mask=sp_ok)
    lse = tl.load(lse_ptr + sp, mask=sp_ok, other=0.0)
    tl.debug_barrier()  # the stats parked by other threads of this program are visible

    # sweep 2: each block's gradient and the partial grads of w, one channel chunk at a time
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        pc_ok = p_ok[:, None] & c_ok[None, :]
        w = tl.load(
            w_ptr + s[:, None] * C + c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0
        )
        go = tl.load(
            go_ptr + sp[:, :, None] * C + c[None, None, :],
            mask=sp_ok[:, :, None] & c_ok[None, None, :],
            other=0.0,
        )
        gw = tl.zeros((BLOCK_S, BLOCK_C), ACC)
        for j in range(n):
            out = tl.load(out_table_ptr + j).to(first_ptr.dtype, bitcast=True)
            r = tl.load(r_ptr + j * P + p64, mask=p_ok, other=0.0)
            q = tl.load(qd_ptr + j * S * P + sp, mask=sp_ok, other=0.0)
            d = tl.load(qd_ptr + (n + j) * S * P + sp, mask=sp_ok, other=0.0)
            beta = tl.where(sp_ok, tl.exp(r[None, :] * q - lse), 0.0)
            coef_w = beta * (d - big_d) * r[None, :]  # ds_sj r_j
            coef_b = tl.sum(coef_w * q, 0) * r * r / C
            b = _load_tile(table_ptr, j, first_ptr, p64, c, pc_ok, ACC)
            gb = tl.sum(beta[:, :, None] * go + coef_w[:, :, None] * w[:, None, :], 0)
            gb -= coef_b[:, None] * b
            tl.store(
                out + p64[:, None] * C + c[None, :], gb.to(first_ptr.dtype.element_ty), mask=pc_ok
            )
            gw += tl.sum(coef_w[:, :, None] * b[None, :, :], 1)
        tl.store(
            gw_ptr + pid * S * C + s[:, None] * C + c[None, :],
            gw,
            mask=s_ok[:, None] & c_ok[None, :],
        )


# ---------------------------------------------------------------------------- launching
# The interpreter runs program instances one after another (~1 ms each): few, large tiles.
# On a GPU: a [BLOCK_S, BLOCK_P, BLOCK_C] tile of ~2K elements in sweep 2 (not tuned yet).
MAX_BLOCK_S = 16
GPU_TILE = 2048


def _query_tile_config(block_s: int, C: int) -> dict[str, int]:
    """A ``[BLOCK_S, BLOCK_P, BLOCK_C]`` tile of `block_s` queries: it shrinks along
    positions and channels as `block_s` grows."""
    if generate.interpreted():
        return dict(BLOCK_S=block_s, BLOCK_P=16, BLOCK_C=64)
    block_c = min(64 if block_s > 2 else 128, triton.next_power_of_2(C))
    block_p = max(1, min(16, GPU_TILE // (block_s * block_c)))
    return dict(BLOCK_S=block_s, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)


def _blocks_config(S: int, C: int) -> dict[str, int]:
    return _query_tile_config(min(MAX_BLOCK_S, triton.next_power_of_2(S)), C)


def _blocks_backward_config(S: int, C: int) -> dict[str, int]:
    """All S queries in one program: a block's gradient sums over them."""
    return _query_tile_config(triton.next_power_of_2(S), C)


def _merge_config(C: int) -> dict[str, int]:
    if generate.interpreted():
        return dict(BLOCK_P=16, BLOCK_C=64)
    return dict(BLOCK_P=16, BLOCK_C=min(128, triton.next_power_of_2(C)), num_warps=4)


def _launch(kernel, grid: tuple[int, ...], *args, **constants) -> None:
    """Run `kernel` on `grid` (one place to record launches, for the sm_90 compile test)."""
    kernel[grid](*args, **constants)


def _rows(v: Tensor, P: int, C: int) -> Tensor:
    """`v` as ``[P, C]``: a view with its own strides (expanded ones too) where the positions
    flatten to one stride, else a copy."""
    try:
        return v.view(P, C)
    except RuntimeError:
        return v.reshape(P, C)


def attnres_blocks(blocks: list[Tensor], queries: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    reference.check_blocks(blocks, queries)
    _check_device(*blocks, queries)
    first = blocks[0]
    pos, C, S, n = tuple(first.shape[:-1]), first.shape[-1], queries.shape[0], len(blocks)
    P = math.prod(pos)
    acc = compute_dtype(first.dtype)
    o = first.new_empty((S, *pos, C), dtype=acc)
    lse = first.new_empty((S, *pos), dtype=acc)
    if o.numel() == 0:
        return o, lse
    rows = [_rows(b, P, C) for b in blocks]
    table = _table(rows)
    logits = first.new_empty((n, S, P), dtype=acc)
    w = queries.to(acc).contiguous()
    config = _blocks_config(S, C)
    grid = (triton.cdiv(P, config["BLOCK_P"]), triton.cdiv(S, config["BLOCK_S"]))
    _launch(
        attnres_blocks_kernel,
        grid,
        table,
        rows[0],
        w,
        logits,
        o,
        lse,
        n,
        S,
        P,
        eps,
        C=C,
        ACC=_acc(first.dtype),
        **config,
    )
    return o, lse


def attnres_merge(o: Tensor, lse: Tensor, partial: Tensor, query: Tensor, eps: float) -> Tensor:
    reference.check_merge(o, lse, partial, query)
    _check_device(o, lse, partial, query)
    C = partial.shape[-1]
    P = math.prod(partial.shape[:-1])
    h = partial.new_empty(partial.shape)
    if h.numel() == 0:
        return h
    acc = compute_dtype(partial.dtype)
    x = _rows(partial, P, C)
    config = _merge_config(C)
    _launch(
        attnres_merge_kernel,
        (triton.cdiv(P, config["BLOCK_P"]),),
        o.to(acc).contiguous(),
        lse.to(acc).contiguous(),
        x,
        query.to(acc).contiguous(),
        h,
        P,
        x.stride(0),
        x.stride(1),
        eps,
        C=C,
        ACC=_acc(partial.dtype),
        **config,
    )
    return h


def _table(rows: list[Tensor]) -> Tensor:
    """Address, position stride and channel stride of each ``[P, C]`` tensor, on its device."""
    entries = [[t.data_ptr(), t.stride(0), t.stride(1)] for t in rows]
    return torch.tensor(entries, dtype=torch.int64).to(rows[0].device)


def _addresses(tensors: list[Tensor]) -> Tensor:
    """The address of each (contiguous) tensor, on its device: a table of outputs."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(tensors[0].device)


def attnres(values: list[Tensor], query: Tensor, eps: float) -> Tensor:
    """``hcpass::attnres``: phase 1 over ``values[:-1]`` with the one query, phase 2 with
    ``values[-1]``."""
    reference.check_inputs(values, query)
    _check_device(*values, query)
    if len(values) == 1:
        return values[0].clone(memory_format=torch.contiguous_format)
    o, lse = attnres_blocks(values[:-1], query[None], eps)
    return attnres_merge(o[0], lse[0], values[-1], query, eps)


def attnres_backward(
    grad: Tensor, values: list[Tensor], query: Tensor, eps: float
) -> tuple[list[Tensor], Tensor]:
    """``hcpass::attnres_backward``: the closed form, in one kernel and a sum over programs."""
    reference.check_inputs(values, query)
    reference.check_grad(grad, values)
    first = values[0]
    _check_device(grad, *values, query)
    if len(values) == 1:
        copy = grad.to(first.dtype).clone(memory_format=torch.contiguous_format)
        return [copy], torch.zeros_like(query, memory_format=torch.contiguous_format)
    k, C = len(values), first.shape[-1]
    P = math.prod(first.shape[:-1])
    acc = compute_dtype(first.dtype)
    grads = [first.new_empty(first.shape) for _ in values]
    if P == 0 or C == 0:
        return grads, torch.zeros_like(query, memory_format=torch.contiguous_format)
    rows = [_rows(v, P, C) for v in values]
    g = _rows(grad, P, C)
    out_table = _addresses(grads)
    config = _merge_config(C)
    programs = triton.cdiv(P, config["BLOCK_P"])
    stats = first.new_empty((3, k, P), dtype=acc)
    grad_w = first.new_empty((programs, C), dtype=acc)
    _launch(
        attnres_bwd_kernel,
        (programs,),
        _table(rows),
        rows[0],
        out_table,
        g,
        query.to(acc).contiguous(),
        stats,
        grad_w,
        k,
        P,
        g.stride(0),
        g.stride(1),
        eps,
        C=C,
        ACC=_acc(first.dtype),
        **config,
    )
    return grads, grad_w.sum(0).to(query.dtype)


def attnres_merge_backward(
    grad: Tensor, o: Tensor, lse: Tensor, partial: Tensor, query: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``hcpass::attnres_merge_backward``: one kernel and a sum over programs."""
    reference.check_merge_backward(grad, o, lse, partial, query)
    _check_device(grad, o, lse, partial, query)
    C = partial.shape[-1]
    P = math.prod(partial.shape[:-1])
    acc = compute_dtype(partial.dtype)
    grad_o = partial.new_empty(partial.shape, dtype=acc)
    grad_lse = partial.new_empty(partial.shape[:-1], dtype=acc)
    grad_p = partial.new_empty(partial.shape)
    if P == 0 or C == 0:
        return (
            grad_o.zero_().to(o.dtype),
            grad_lse.zero_().to(lse.dtype),
            grad_p.zero_(),
            torch.zeros_like(query, memory_format=torch.contiguous_format),
        )
    x, g = _rows(partial, P, C), _rows(grad, P, C)
    config = _merge_config(C)
    programs = triton.cdiv(P, config["BLOCK_P"])
    grad_w = partial.new_empty((programs, C), dtype=acc)
    _launch(
        attnres_merge_bwd_kernel,
        (programs,),
        g,
        o.to(acc).contiguous(),
        lse.to(acc).contiguous(),
        x,
        query.to(acc).contiguous(),
        grad_o,
        grad_lse,
        grad_p,
        grad_w,
        P,
        x.stride(0),
        x.stride(1),
        g.stride(0),
        g.stride(1),
        eps,
        C=C,
        ACC=_acc(partial.dtype),
        **config,
    )
    return grad_o.to(o.dtype), grad_lse.to(lse.dtype), grad_p, grad_w.sum(0).to(query.dtype)


def attnres_blocks_backward(
    grad_o: Tensor,
    grad_lse: Tensor,
    blocks: list[Tensor],
    queries: Tensor,
    o: Tensor,
    lse: Tensor,
    eps: float,
) -> tuple[list[Tensor], Tensor]:
    """``hcpass::attnres_blocks_backward``: one kernel (all S queries of a position tile in
    one program, so each block's gradient is written once) and a sum over programs."""
    reference.check_blocks_backward(grad_o, grad_lse, blocks, queries, o, lse)
    first = blocks[0]
    _check_device(grad_o, grad_lse, *blocks, queries, o, lse)
    n, S, C = len(blocks), queries.shape[0], first.shape[-1]
    P = math.prod(first.shape[:-1])
    acc = compute_dtype(first.dtype)
    grads = [first.new_empty(first.shape) for _ in blocks]
    if P == 0 or C == 0:
        return grads, torch.zeros_like(queries, memory_format=torch.contiguous_format)
    rows = [_rows(b, P, C) for b in blocks]
    out_table = _addresses(grads)
    config = _blocks_backward_config(S, C)
    programs = triton.cdiv(P, config["BLOCK_P"])
    grad_w = first.new_empty((programs, S, C), dtype=acc)
    _launch(
        attnres_blocks_bwd_kernel,
        (programs,),
        _table(rows),
        rows[0],
        out_table,
        queries.to(acc).contiguous(),
        grad_o.to(acc).contiguous(),
        o.to(acc).contiguous(),
        lse.to(acc).contiguous(),
        grad_lse.to(acc).contiguous(),
        first.new_empty((n, P), dtype=acc),
        first.new_empty((2, n, S, P), dtype=acc),
        grad_w,
        n,
        S,
        P,
        eps,
        C=C,
        ACC=_acc(first.dtype),
        **config,
    )
    return grads, grad_w.sum(0).to(queries.dtype)


# op name -> launcher: what `register_cuda_kernels` installs as the ops' CUDA kernels.
LAUNCHERS: dict[str, Callable] = {
    "attnres": attnres,
    "attnres_backward": attnres_backward,
    "attnres_blocks": attnres_blocks,
    "attnres_blocks_backward": attnres_blocks_backward,
    "attnres_merge": attnres_merge,
    "attnres_merge_backward": attnres_merge_backward,
}
