"""The boundary between consecutive sites of a residual chain, in a rewritten graph.

Where site l's merge feeds site l+1 directly::

    merge              = hcpass.post_res(x, y, H_post, H_res)
    coeffs             = hcpass.coeffs(merge, phi, alpha, bias, spec)
    H_pre', H_post', H_res' = coeffs[0], coeffs[1], coeffs[2]
    pre                = hcpass.pre(merge, H_pre')

`hcpass.lowering.passes.fuse_across_sites` replaces these nodes by one fused op. A chain's
first site has no merge before it (its state comes from ``expand``), and a stream that passes
through a per-stream op first (a post-norm's flatten / layer_norm / unflatten) reaches the
next coefficients through that op: neither matches, and the skip says which step failed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from hcpass import ops as _ops  # noqa: F401  (registers torch.ops.hcpass)

from .matcher import Call, Outputs, Pattern, User
from .node_sets import target_name

_OPS = torch.ops.hcpass


@dataclass(frozen=True)
class SiteBoundary:
    """The nodes one fused op replaces."""

    merge: fx.Node  # post_res of site l
    coeffs: fx.Node  # coeffs of site l+1, reading the merge
    outputs: dict[int, list[fx.Node]]  # coeffs' getitem nodes by output index
    h_pre: fx.Node  # the output-0 getitem that `pre` reads
    pre: fx.Node  # pre of site l+1: (merge, H_pre')


def _goes_to(merge: fx.Node) -> str:
    """Names what reads the merge instead, for the log."""
    readers = sorted({target_name(u) for u in merge.users})
    return "no site reads its output directly" + (
        f" (it goes to {', '.join(readers)})" if readers else ""
    )


_NOT_PRE = "the next site's branch input is not pre(merge, H_pre)"

SITE_BOUNDARY = Pattern(
    root="merge",
    call=Call(_OPS.post_res.default, (...,)),  # merge = post_res(x, y, H_post, H_res)
    steps=(
        # coeffs = coeffs(merge, phi, alpha, bias, spec)
        User("coeffs", "merge", Call(_OPS.coeffs.default, ("merge", ...)), missing=_goes_to),
        # every reader of coeffs takes one of its outputs: the fused op returns them all
        Outputs(
            "outputs", "coeffs", missing="the next site's coefficients are used whole, not indexed"
        ),
        # h_pre = coeffs[0]
        User("h_pre", "coeffs", Call(operator.getitem, ("coeffs", 0)), missing=_NOT_PRE),
        # pre = pre(merge, h_pre)
        User("pre", "h_pre", Call(_OPS.pre.default, ("merge", "h_pre")), missing=_NOT_PRE),
    ),
    build=SiteBoundary,
)
