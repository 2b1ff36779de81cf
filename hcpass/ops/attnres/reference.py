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

The two phases (the paper's split of Block AttnRes, used by the CUDA kernels). The k values
split into completed blocks ``b_1..b_n`` (n = k - 1) and the current partial block ``p``:

- phase 1, `attnres_blocks`: S queries that see the same completed blocks attend over them
  in one pass (one read of each block for all S queries), keeping online-softmax statistics
  per (query, position): the running max ``m = max_j s_j``, the sum ``l = sum_j exp(s_j - m)``
  and the normalised partial output ``o = sum_j exp(s_j - m) b_j / l``;
- phase 2, `attnres_merge`: one query merges those with its partial block, whose logit is
  ``s_p = r_p <w, p>``: with ``m' = max(m, s_p)``, ``a = l exp(m - m')``,
  ``b = exp(s_p - m')``, ``h = (a o + b p) / (a + b)``.

``attnres(values, w) == attnres_merge(o[0], m[0], l[0], values[-1], w)`` with
``o, m, l = attnres_blocks(values[:-1], w[None])`` for k >= 2.
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
def attnres_blocks(
    blocks: list[Tensor], queries: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Phase 1: S queries ``[S, C]`` over n >= 1 completed blocks ``[*pos, C]``.

    Returns, in compute dtype and contiguous, the normalised partial output
    ``o [S, *pos, C] = sum_j exp(s_j - m) b_j / l``, the running max ``m [S, *pos]`` and
    ``l [S, *pos] = sum_j exp(s_j - m)``, where ``s_j = r_j <w_s, b_j>``.
    """
    check_values(blocks, "blocks")
    check_query(queries, blocks[0].shape[-1], blocks[0].device, rows=True)
    acc = compute_dtype(blocks[0].dtype)
    w = queries.to(acc)
    keys = [b.to(acc) for b in blocks]
    # [n, S, *pos]
    logits = torch.stack(
        [(_rms_inv(k, eps).unsqueeze(-1) * (k @ w.T)).movedim(-1, 0) for k in keys]
    )
    m = logits.amax(0)
    p = torch.exp(logits - m)
    l = p.sum(0)  # noqa: E741
    weights = (p / l).unsqueeze(-1)  # [n, S, *pos, 1]
    o = weights[0] * keys[0]
    for j in range(1, len(keys)):
        o = o + weights[j] * keys[j]
    return o.contiguous(), m.contiguous(), l.contiguous()


def attnres_merge(
    o: Tensor,
    m: Tensor,
    l: Tensor,  # noqa: E741
    partial: Tensor,
    query: Tensor,
    eps: float,
) -> Tensor:
    """Phase 2: merge one query's phase-1 statistics (``o [*pos, C]``, ``m``, ``l [*pos]``)
    with the partial block ``[*pos, C]``; h in the partial block's dtype, contiguous."""
    check_values([partial], "partial")
    check_query(query, partial.shape[-1], partial.device)
    if o.shape != partial.shape or m.shape != partial.shape[:-1] or l.shape != m.shape:
        raise ValueError(
            f"attnres_merge: o {tuple(o.shape)}, m {tuple(m.shape)}, l {tuple(l.shape)} do "
            f"not fit the partial block {tuple(partial.shape)}"
        )
    acc = compute_dtype(partial.dtype)
    pf, w = partial.to(acc), query.to(acc)
    s = _rms_inv(pf, eps) * _dot(pf, w)
    m, l = m.to(acc), l.to(acc)  # noqa: E741
    top = torch.maximum(m, s)
    a = (l * torch.exp(m - top)).unsqueeze(-1)
    b = torch.exp(s - top).unsqueeze(-1)
    return ((a * o.to(acc) + b * pf) / (a + b)).to(partial.dtype).contiguous()
