"""CPU lowering: replace the ``hcpass::`` ops by their plain-PyTorch references.

Inductor then traces the references with the rest of the graph, differentiates them with
AOTAutograd and fuses them into its C++ kernels, instead of calling the ops as opaque
extern kernels with a recomputing backward.

The references run on states whose positions are flattened into one dimension
(``x[n, P, C]``), and the coefficients stay flat between a site's ops. A conv net's
per-position tensors would otherwise be 4-D ``[B, H, W, k]`` (the flattened state the
projection saves, ``H_pre``), and Inductor treats every 4-D tensor next to a convolution as
an NCHW activation: its layout optimisation gives a saved one channels-last strides computed
from ``(B, H, W, k)``, which under dynamic shapes it cannot order (``1 < H`` undecided:
"cannot determine truth value of Relational") -- training at a second input size failed.
Flat, they have at most one symbolic dimension, and the saved projection input has static
strides.

Every site's ``coeffs`` is inlined, so a converted model's cold compile grows with its depth
faster than the plain model's (docs/performance.md). Sharing one compiled subgraph between
sites (PyTorch's ``invoke_subgraph``) halved the compile time but gave wrong gradients for
the `hc` manifold's mixers, so it is not used.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor, fx

from hcpass.lowering.passes.manager import GraphPass
from hcpass.ops import REFERENCE

_ops = torch.ops.hcpass


def _flat(x: Tensor) -> Tensor:
    """``x[n, *positions, C]`` -> ``x[n, P, C]`` (a copy where the positions are not
    contiguous, as for a conv state whose channels were moved last; Inductor fuses it)."""
    return x.flatten(1, -2) if x.dim() > 3 else x


def coeffs(x: Tensor, phi: Tensor | None, alpha: Tensor | None, bias: Tensor, manifold: str):
    """Flat coefficients ``[P, n]``, ``[P, n]``, ``[P, n, n]``: only `pre` and `post_res`
    below read them."""
    return REFERENCE[_ops.coeffs.default](_flat(x), phi, alpha, bias, manifold)


def pre(x: Tensor, h_pre: Tensor) -> Tensor:
    u = REFERENCE[_ops.pre.default](_flat(x), h_pre)
    return u.view(x.shape[1:])


def post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    out = REFERENCE[_ops.post_res.default](_flat(x), y.flatten(0, -2), h_post, h_res)
    return out.view(x.shape)


def post_res_coeffs_pre(x, y, h_post, h_res, phi, alpha, bias, manifold):
    out = post_res(x, y, h_post, h_res)
    h_pre_next, h_post_next, h_res_next = coeffs(out, phi, alpha, bias, manifold)
    return out, h_pre_next, h_post_next, h_res_next, pre(out, h_pre_next)


# Every op of a rewritten graph that makes or reads coefficients: all of them must be
# replaced together, since the coefficients between them are flat.
LOWERED = {
    _ops.coeffs.default: coeffs,
    _ops.pre.default: pre,
    _ops.post_res.default: post_res,
    _ops.post_res_coeffs_pre.default: post_res_coeffs_pre,
}


class LowerToReference(GraphPass):
    def __call__(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function" and node.target in LOWERED:
                node.target = LOWERED[node.target]
            elif node.op == "get_attr" and graph.owning_module is not None:
                # activation-checkpoint bodies hold mixer ops too (hcpass.rewrite.regions)
                body = operator.attrgetter(node.target)(graph.owning_module)
                if isinstance(body, fx.GraphModule):
                    self(body.graph)
                    body.recompile()
