"""Attention Residuals (Kimi Team, arXiv 2603.15031) in plain PyTorch: the math of the
``hcpass::attnres`` op, its closed-form backward, and the two phases the kernels split it in.

The contract every back end implements (the Triton launchers in `hcpass.codegen.attnres`
have exactly these signatures) and the CPU path: the hcpass backend substitutes these
functions for the ops (`hcpass.ops.REFERENCE`) so Inductor fuses them into C++.

Forward. Values ``v_i [*pos, C]``, i = 1..k (the outputs of earlier blocks or layers), all of
one shape, dtype and device, any strides; a pseudo-query ``w [C]`` (one learned vector per
layer). Per position, accumulated in ``compute_dtype`` (fp32; fp64 for fp64 values)::

    r_i   = (mean_c v_i^2 + eps)^(-1/2)         RMSNorm of the key, no weight (w has it)
    q_i   = <w, v_i>,   s_i = r_i q_i           logit of value i
    alpha = softmax_i(s)                        attention over depth
    h     = sum_i alpha_i v_i                   returned in the values' dtype, contiguous

With w = 0 every alpha_i is 1/k and h is the mean of the values; k = 1 gives h = v_1.

Backward. Given g = dL/dh (in compute dtype):

    dL/dalpha_i = <g, v_i> =: d_i
    dL/ds_i     = alpha_i (d_i - sum_j alpha_j d_j) =: ds_i      (softmax vjp)
    ds_i/dv_i   = r_i w + q_i dr_i/dv_i,  dr_i/dv_i = -(1/2) r_i^3 (2 v_i / C) = -r_i^3 v_i / C
    dL/dv_i     = alpha_i g + ds_i r_i (w - r_i^2 q_i v_i / C)
    dL/dw       = sum_pos sum_i ds_i r_i v_i

`attnres_backward` recomputes r, q, alpha from the inputs (values, query): nothing but the
inputs is saved, so a model keeps the memory of its plain residual stream.

The two phases (the paper's split of Block AttnRes, used on CUDA). The k values split into
completed blocks ``b_1..b_n`` (n = k - 1) and the current partial block ``p``. Flash-attention
style, each query keeps its log-sum-exp:

- phase 1, `attnres_blocks`: S queries ``w_s`` that see the same completed blocks attend
  over them in one pass (one read of each block for all S queries)::

      s_sj = r_j <w_s, b_j>,   lse_s = log sum_j exp(s_sj),   beta_sj = exp(s_sj - lse_s)
      o_s  = sum_j beta_sj b_j                      o [S, *pos, C], lse [S, *pos]

- phase 2, `attnres_merge`: one query merges its (o, lse) with its partial block, whose
  logit is ``s_p = r_p q_p``, ``q_p = <w, p>``::

      gamma = sigmoid(lse - s_p)   (the weight of all the blocks together)
      h     = gamma o + (1 - gamma) p

``attnres(values, w) == attnres_merge(o[0], lse[0], values[-1], w)`` with
``o, lse = attnres_blocks(values[:-1], w[None])`` for k >= 2.

Backward of phase 2 (`attnres_merge_backward`), g = dL/dh, ``e = <g, o - p>``::

    dL/dgamma = e,   dgamma/dlse = gamma (1 - gamma) = -dgamma/ds_p
    grad o    = gamma g,   grad lse = gamma (1 - gamma) e,   ds_p = -gamma (1 - gamma) e
    grad p    = (1 - gamma) g + ds_p r_p (w - r_p^2 q_p p / C)     (ds_p/dp as ds_i/dv_i)
    grad w    = sum_pos ds_p r_p p

Backward of phase 1 (`attnres_blocks_backward`), given grad o_s and grad lse_s: the softmax
vjp, with dlse_s/ds_sj = beta_sj::

    D_s      = <grad o_s, o_s> - grad lse_s
    ds_sj    = beta_sj (<grad o_s, b_j> - D_s)
    grad b_j = sum_s [beta_sj grad o_s + ds_sj r_j w_s - ds_sj r_j^3 q_sj b_j / C]
    grad w_s = sum_pos sum_j ds_sj r_j b_j

It reads the saved o and lse (beta from lse and the recomputed logits), so the forward's
weighted sum is never recomputed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcpass.manifolds.base import compute_dtype

FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------- checks
def check_values(values: list[Tensor] | tuple[Tensor, ...], what: str = "values") -> None:
    """k >= 1 tensors ``[*pos, C]`` of one shape, floating dtype and device."""
    if len(values) == 0:
        raise ValueError(f"attnres: {what} is empty; it needs at least one tensor")
    first = values[0]
    if first.dtype not in FLOATING:
        raise ValueError(f"attnres: {what} must be fp32, fp64, bf16 or fp16, got {first.dtype}")
    if first.dim() == 0:
        raise ValueError(f"attnres: {what} must have a channel dimension, got a scalar")
    for index, v in enumerate(values[1:], 1):
        if v.shape != first.shape or v.dtype != first.dtype or v.device != first.device:
            raise ValueError(
                f"attnres: {what}[{index}] is {_describe(v)}, but {what}[0] is "
                f"{_describe(first)}; all must have one shape, dtype and device"
            )


def check_query(query: Tensor, channels: int, device: torch.device, rows: bool = False) -> None:
    """A floating query ``[C]`` (``[S, C]`` if `rows`) on `device`."""
    shape = "[S, C]" if rows else "[C]"
    if query.dim() != (2 if rows else 1) or query.shape[-1] != channels:
        raise ValueError(
            f"attnres: the query must be {shape} with C = {channels} (the values' last "
            f"dimension), got {tuple(query.shape)}"
        )
    if query.dtype not in FLOATING:
        raise ValueError(f"attnres: the query must be floating, got {query.dtype}")
    if query.device != device:
        raise ValueError(f"attnres: the query is on {query.device}, the values on {device}")


def check_inputs(values: list[Tensor] | tuple[Tensor, ...], query: Tensor) -> None:
    check_values(values)
    check_query(query, values[0].shape[-1], values[0].device)


def check_grad(grad: Tensor, values: list[Tensor] | tuple[Tensor, ...]) -> None:
    """The gradient of h has the values' shape."""
    if grad.shape != values[0].shape:
        raise ValueError(
            f"attnres_backward: grad is {tuple(grad.shape)}, the values {tuple(values[0].shape)}"
        )


def _describe(t: Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


# ------------------------------------------------------------------------------ helpers
def _rms_inv(v: Tensor, eps: float) -> Tensor:
    """``r = (mean_c v^2 + eps)^(-1/2)`` of `v` (already in compute dtype), ``[*pos]``."""
    return torch.rsqrt(v.square().mean(-1) + eps)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` over channels (elementwise product and sum: Inductor fuses it)."""
    return (a * b).sum(-1)


# --------------------------------------------------------------------------------- op
def attnres(values: list[Tensor], query: Tensor, eps: float) -> Tensor:
    """``h = sum_i softmax_i(r_i <w, v_i>) v_i`` (module docstring), ``[*pos, C]`` in the
    values' dtype, contiguous. Never stacks the values: one pass for the logits, one for h."""
    check_inputs(values, query)
    first = values[0]
    if len(values) == 1:
        return first.clone(memory_format=torch.contiguous_format)
    acc = compute_dtype(first.dtype)
    alpha = weights(values, query, eps).unsqueeze(-1)  # [k, *pos, 1]
    h = alpha[0] * first.to(acc)
    for i in range(1, len(values)):
        h = h + alpha[i] * values[i].to(acc)
    return h.to(first.dtype).contiguous()


def weights(values: list[Tensor], query: Tensor, eps: float) -> Tensor:
    """``alpha = softmax_i(r_i <w, v_i>)``, the attention over depth, ``[k, *pos]`` in
    compute dtype (`attnres`'s weights; `hcpass.depth_weights` reports them)."""
    acc = compute_dtype(values[0].dtype)
    w = query.to(acc)
    logits = []
    for v in values:
        vf = v.to(acc)
        logits.append(_rms_inv(vf, eps) * _dot(vf, w))
    return torch.softmax(torch.stack(logits), 0)


def attnres_backward(
    grad: Tensor, values: list[Tensor], query: Tensor, eps: float
) -> tuple[list[Tensor], Tensor]:
    """(grad of each value in the values' dtype, grad of the query in its dtype), the closed
    form of the module docstring, recomputing r, q and alpha from the inputs."""
    check_inputs(values, query)
    check_grad(grad, values)
    first = values[0]
    dtype = first.dtype
    if len(values) == 1:
        return [grad.to(dtype).clone(memory_format=torch.contiguous_format)], torch.zeros_like(
            query, memory_format=torch.contiguous_format
        )
    acc = compute_dtype(dtype)
    w, g = query.to(acc), grad.to(acc)
    r, q, d = [], [], []
    for v in values:
        vf = v.to(acc)
        r.append(_rms_inv(vf, eps))
        q.append(_dot(vf, w))
        d.append(_dot(vf, g))
    r, q, d = torch.stack(r), torch.stack(q), torch.stack(d)  # [k, *pos]
    alpha = torch.softmax(r * q, 0)
    ds = alpha * (d - (alpha * d).sum(0))
    coef_w = (ds * r).unsqueeze(-1)  # weight of w in grad v_i, of v_i in grad w
    coef_v = coef_w * (r * r * q / first.shape[-1]).unsqueeze(-1)
    alpha = alpha.unsqueeze(-1)
    grad_values, grad_w = [], torch.zeros_like(w)
    for i, v in enumerate(values):
        vf = v.to(acc)
        gv = alpha[i] * g + coef_w[i] * w - coef_v[i] * vf
        grad_values.append(gv.to(dtype).contiguous())
        grad_w = grad_w + (coef_w[i] * vf).reshape(-1, w.shape[0]).sum(0)
    return grad_values, grad_w.to(query.dtype)


# ------------------------------------------------------------------------------ phases
def check_blocks(blocks: list[Tensor] | tuple[Tensor, ...], queries: Tensor) -> None:
    """n >= 1 blocks ``[*pos, C]`` and queries ``[S, C]``."""
    check_values(blocks, "blocks")
    check_query(queries, blocks[0].shape[-1], blocks[0].device, rows=True)


def check_phase_one(o: Tensor, lse: Tensor, blocks: list[Tensor], queries: Tensor) -> None:
    """``o [S, *pos, C]`` and ``lse [S, *pos]`` fit the blocks and queries (their gradients
    too)."""
    want = (queries.shape[0], *blocks[0].shape)
    if o.shape != want or lse.shape != want[:-1]:
        raise ValueError(
            f"attnres_blocks_backward: o {tuple(o.shape)} and lse {tuple(lse.shape)} do not "
            f"fit {len(queries)} queries over blocks {tuple(blocks[0].shape)}: o must be "
            f"{want}, lse {want[:-1]}"
        )


def check_merge(o: Tensor, lse: Tensor, partial: Tensor, query: Tensor) -> None:
    """One query's ``o [*pos, C]`` and ``lse [*pos]`` fit the partial block ``[*pos, C]``."""
    check_values([partial], "partial")
    check_query(query, partial.shape[-1], partial.device)
    if o.shape != partial.shape or lse.shape != partial.shape[:-1]:
        raise ValueError(
            f"attnres_merge: o {tuple(o.shape)} and lse {tuple(lse.shape)} do not fit the "
            f"partial block {tuple(partial.shape)}: o must have its shape, lse its shape "
            "without the channels"
        )


def check_blocks_backward(
    grad_o: Tensor,
    grad_lse: Tensor,
    blocks: list[Tensor] | tuple[Tensor, ...],
    queries: Tensor,
    o: Tensor,
    lse: Tensor,
) -> None:
    """The inputs of ``attnres_blocks_backward``: phase 1's inputs, its outputs and their
    gradients fit one another."""
    check_blocks(blocks, queries)
    for t in (o, grad_o):
        check_phase_one(t, lse, blocks, queries)
    check_phase_one(o, grad_lse, blocks, queries)


def check_merge_backward(
    grad: Tensor, o: Tensor, lse: Tensor, partial: Tensor, query: Tensor
) -> None:
    """The inputs of ``attnres_merge_backward``: the merge's inputs, and grad h shaped as the
    partial block."""
    check_merge(o, lse, partial, query)
    check_grad(grad, [partial])


def _block_logits(keys: list[Tensor], w: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``r [n, 1, *pos]``, ``q [n, S, *pos]`` and ``s = r q`` of keys in compute dtype."""
    r = torch.stack([_rms_inv(k, eps) for k in keys]).unsqueeze(1)
    q = torch.stack([(k @ w.T).movedim(-1, 0) for k in keys])
    return r, q, r * q


def attnres_blocks(blocks: list[Tensor], queries: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Phase 1: S queries ``[S, C]`` over n >= 1 completed blocks ``[*pos, C]``: ``o
    [S, *pos, C]`` and ``lse [S, *pos]`` (module docstring), in compute dtype, contiguous."""
    check_blocks(blocks, queries)
    acc = compute_dtype(blocks[0].dtype)
    keys = [b.to(acc) for b in blocks]
    _, _, logits = _block_logits(keys, queries.to(acc), eps)  # [n, S, *pos]
    lse = torch.logsumexp(logits, 0)
    beta = torch.exp(logits - lse).unsqueeze(-1)
    o = beta[0] * keys[0]
    for j in range(1, len(keys)):
        o = o + beta[j] * keys[j]
    return o.contiguous(), lse.contiguous()


def attnres_blocks_backward(
    grad_o: Tensor,
    grad_lse: Tensor,
    blocks: list[Tensor],
    queries: Tensor,
    o: Tensor,
    lse: Tensor,
    eps: float,
) -> tuple[list[Tensor], Tensor]:
    """(grad of each block in the blocks' dtype, grad of the queries in their dtype), the
    closed form of the module docstring from the saved ``o`` and ``lse``."""
    check_blocks_backward(grad_o, grad_lse, blocks, queries, o, lse)
    dtype, C = blocks[0].dtype, blocks[0].shape[-1]
    acc = compute_dtype(dtype)
    keys = [b.to(acc) for b in blocks]
    w, go = queries.to(acc), grad_o.to(acc)
    r, q, logits = _block_logits(keys, w, eps)  # [n, 1 | S, *pos]
    beta = torch.exp(logits - lse.to(acc))
    big_d = _dot(go, o.to(acc)) - grad_lse.to(acc)  # [S, *pos]
    ds = beta * (torch.stack([_dot(go, k) for k in keys]) - big_d)
    coef_w = ds * r  # weight of w_s in grad b_j, of b_j in grad w_s
    coef_b = (coef_w * q).sum(1) * (r[:, 0] ** 2 / C)  # [n, *pos]
    grad_blocks, grad_w = [], torch.zeros_like(w)
    for j, k in enumerate(keys):
        gb = (beta[j].unsqueeze(-1) * go).sum(0) + (coef_w[j].movedim(0, -1) @ w)
        gb = gb - coef_b[j].unsqueeze(-1) * k
        grad_blocks.append(gb.to(dtype).contiguous())
        grad_w = grad_w + coef_w[j].reshape(len(w), -1) @ k.reshape(-1, C)
    return grad_blocks, grad_w.to(queries.dtype)


def attnres_merge(o: Tensor, lse: Tensor, partial: Tensor, query: Tensor, eps: float) -> Tensor:
    """Phase 2: merge one query's ``o [*pos, C]`` and ``lse [*pos]`` with the partial block
    ``[*pos, C]``: h in the partial block's dtype, contiguous."""
    check_merge(o, lse, partial, query)
    acc = compute_dtype(partial.dtype)
    pf = partial.to(acc)
    s = _rms_inv(pf, eps) * _dot(pf, query.to(acc))
    gamma = torch.sigmoid(lse.to(acc) - s).unsqueeze(-1)
    return (gamma * o.to(acc) + (1 - gamma) * pf).to(partial.dtype).contiguous()


def attnres_merge_backward(
    grad: Tensor, o: Tensor, lse: Tensor, partial: Tensor, query: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad o, grad lse, grad partial, grad query), each in its input's dtype: the closed
    form of the module docstring, recomputing gamma from the inputs."""
    check_merge_backward(grad, o, lse, partial, query)
    acc, C = compute_dtype(partial.dtype), partial.shape[-1]
    pf, w, g, of = partial.to(acc), query.to(acc), grad.to(acc), o.to(acc)
    r, q = _rms_inv(pf, eps), _dot(pf, w)
    gamma = torch.sigmoid(lse.to(acc) - r * q)
    slope = gamma * (1 - gamma) * _dot(g, of - pf)  # grad lse = -ds_p
    coef_w = (-slope * r).unsqueeze(-1)  # ds_p r_p
    grad_p = (1 - gamma).unsqueeze(-1) * g + coef_w * (w - (r * r * q / C).unsqueeze(-1) * pf)
    grad_w = (coef_w * pf).reshape(-1, C).sum(0)
    return (
        (gamma.unsqueeze(-1) * g).to(o.dtype).contiguous(),
        slope.to(lse.dtype).contiguous(),
        grad_p.to(partial.dtype).contiguous(),
        grad_w.to(query.dtype),
    )
