"""``@triton.jit`` helpers that both kernel templates use, written once.

Not imported at run time: `generate.py` splices these definitions into every template, in
place of the template's ``from .jit_helpers import ...`` between its SHARED markers, so each
generated kernel module carries its helpers and they are decorated in the same mode
(compiled or interpreted) as the kernels calling them (see generate.py). The templates'
import is what a reader and the linter follow here.
"""

import triton
import triton.language as tl


@triton.jit
def merge_streams(
    x_ptr, y_ptr, hres_ptr, hpost, out_ptr, p, c, P, N: tl.constexpr, C: tl.constexpr
):
    """The residual merge ``X'[i] = sum_j H_res[i, j] x[j] + H_post[i] y`` of positions `p`
    and channels `c`, every stream i at once: written to `out_ptr` and returned as written,
    an ``[NP, BLOCK_P, BLOCK_C]`` tile in the stream dtype (padded streams hold zeros).

    `hpost` is H_post already loaded as ``[NP, BLOCK_P]`` (stream, position) in the
    accumulator dtype, which the merge sums in. Reads (n+1)C and writes nC per position.
    """
    ACC: tl.constexpr = hpost.dtype
    NP: tl.constexpr = hpost.shape[0]
    BLOCK_P: tl.constexpr = p.shape[0]
    BLOCK_C: tl.constexpr = c.shape[0]
    s = tl.arange(0, NP)
    p_ok = p < P
    pc_ok = p_ok[:, None] & (c < C)[None, :]
    sp_ok = (s < N)[:, None] & p_ok[None, :]
    mixed = tl.zeros((NP, BLOCK_P, BLOCK_C), ACC)
    for j in range(N):
        xj = tl.load(x_ptr + (j * P + p[:, None]) * C + c[None, :], mask=pc_ok, other=0.0).to(ACC)
        hj = tl.load(
            hres_ptr + p[None, :] * (N * N) + s[:, None] * N + j, mask=sp_ok, other=0.0
        ).to(ACC)
        mixed += hj[:, :, None] * xj[None, :, :]
    y = tl.load(y_ptr + p[:, None] * C + c[None, :], mask=pc_ok, other=0.0).to(ACC)
    out = (mixed + hpost[:, :, None] * y[None, :, :]).to(out_ptr.dtype.element_ty)
    spc = (s[:, None, None] * P + p[None, :, None]) * C + c[None, None, :]
    tl.store(out_ptr + spc, out, mask=(s < N)[:, None, None] & pc_ok[None, :, :])
    return out
