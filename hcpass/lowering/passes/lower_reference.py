"""CPU lowering: the mixer ops become plain PyTorch that Inductor compiles.

``pre`` and ``post_res`` read and write the n-stream state, the model's largest tensors:
they are replaced by their references inline, so Inductor differentiates them with
AOTAutograd and fuses them into the C++ kernels of their neighbours (the branch's first op,
the next site's mix) instead of reading the state back an extra time.

The references run on states whose positions are flattened into one dimension
(``x[n, P, C]``), and the coefficients stay flat between a site's ops. A conv net's
per-position tensors would otherwise be 4-D ``[B, H, W, k]`` (``H_pre``, the projection's
logits), and Inductor treats every 4-D tensor next to a convolution as
an NCHW activation: its layout optimisation gives a saved one channels-last strides computed
from ``(B, H, W, k)``, which under dynamic shapes it cannot order (``1 < H`` undecided:
"cannot determine truth value of Relational") -- training at a second input size failed.
Flat, they have at most one symbolic dimension.

``coeffs`` is long: the projection, the maps and their backward (Sinkhorn's iterations are
one op, `hcpass::sinkhorn`; unrolled they made one site's coefficients ~685 FX nodes).
Inlined at every site, that graph was traced, partitioned, lowered and scheduled again per
site, so a converted model's cold compile grew ~12x faster per layer than the plain model's
(docs/performance.md). Kept an opaque op it compiles fast but runs eagerly, slower per
training step. Instead every
site whose coefficients are the same function (manifold spec, which of phi/alpha it has) of
a state of the same shape and dtype calls one shared subgraph through PyTorch's
``invoke_subgraph`` higher-order op (what ``torch.compiler.nested_compile_region`` records),
which AOTAutograd traces and Inductor compiles once per distinct subgraph. A site whose
state is a channels-last view of an NCHW stream (conv nets) gets the reference inline: the
layout Inductor picks for that view is not one a shared subgraph can be traced for.

A shared subgraph needs `hcpass.lowering.passes.subgraph_aliases` under Inductor (the backend
adds it): torch 2.13's Inductor reuses the buffer of a subgraph's operand once the call is
its last visible use, even when the partitioned subgraph returned that operand as a tensor
saved for backward. hc's projection saves the state itself, so its backward read a later
site's state and its gradients came out wrong (relative errors above 1) until that pass gave
the saved tensors buffers of their own; the base class's projection (sinkhorn, kronecker)
then saved a flattened copy of the state, which is why they were right. It now reads the
state in place as well (stream by stream), so every manifold relies on that pass.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import operator

import torch
from torch import Tensor, fx

from hcpass.lowering.passes.manager import GraphPass
from hcpass.lowering.passes.save_stream_states import tag_stream_state
from hcpass.manifolds import resolve
from hcpass.ops import REFERENCE
from hcpass.rewrite.chains import COEFFS_STATE

_COEFFS = torch.ops.hcpass.coeffs.default
# Where hcpass creates calls of this private higher-order op (its signature:
# ``invoke_subgraph(subgraph, identifier, *operands)``, returning the subgraph's outputs).
_INVOKE_SUBGRAPH = torch.ops.higher_order.invoke_subgraph
_ops = torch.ops.hcpass

log = logging.getLogger("hcpass")


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
        shared: set[tuple] = set()
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target is _COEFFS and _shareable(node):
                _share_coefficients(graph, node, shared)
            elif node.op == "call_function" and node.target in LOWERED:
                node.target = LOWERED[node.target]
                if node.target in (post_res, post_res_coeffs_pre):
                    tag_stream_state(node)
            elif node.op == "call_function" and node.target in REFERENCE:
                node.target = REFERENCE[node.target]  # Attention Residuals
            elif node.op == "get_attr" and graph.owning_module is not None:
                # activation-checkpoint bodies hold mixer ops too (hcpass.rewrite.regions)
                body = operator.attrgetter(node.target)(graph.owning_module)
                if isinstance(body, fx.GraphModule):
                    self(body.graph)
                    body.recompile()


def _shareable(node: fx.Node) -> bool:
    if COEFFS_STATE not in node.meta:
        return False
    _, *params, spec = node.args
    present = tuple(p is not None for p in params)
    effects = _side_effects(spec, present, node.meta[COEFFS_STATE][1])
    return not effects


@functools.cache
def _side_effects(spec: str, present: tuple[bool, ...], dtype: torch.dtype) -> tuple[str, ...]:
    """The ops with side effects (torch's effect registry) that `spec`'s coefficients call.

    torch.linalg.solve and inv (the Cayley transform of stiefel, grassmann, spectral) check
    their input with ``aten._linalg_check_errors``, which AOTAutograd threads an effect
    token through; inside an ``invoke_subgraph`` body (torch 2.13) every gradient through
    the subgraph then comes out None, silently. Such coefficients are inlined instead. Traced
    once per function on one-position fake inputs: the ops do not depend on the sizes."""
    from torch._higher_order_ops.effects import has_effects
    from torch.fx.experimental.proxy_tensor import make_fx

    manifold = resolve(spec)
    x = torch.zeros(manifold.streams, 1, 1, dtype=dtype)
    params = [
        torch.zeros(shape) if keep else None
        for shape, keep in zip(
            (manifold.phi_shape(1), (3,), (manifold.num_logits,)), present, strict=True
        )
    ]
    inputs = [x, *(p for p in params if p is not None)]

    def run(*tensors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        it = iter(tensors)
        args = [next(it), *(next(it) if p is not None else None for p in params)]
        return REFERENCE[_COEFFS](*args, spec)

    # Outside the compile's tracing context, whose fake mode make_fx would reuse: its shape
    # environment (Dynamo's guards) must not see this trace.
    with torch._guards.tracing(None):
        traced = make_fx(run, tracing_mode="fake")(*inputs)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    effects = tuple(sorted(str(t) for t in targets if has_effects(t)))
    if effects:
        log.info(
            "hcpass: %s's coefficients are inlined at every site, not shared: they call %s, "
            "an op with side effects, and torch's AOTAutograd drops every gradient through a "
            "shared subgraph (invoke_subgraph) that holds one",
            manifold.name,
            ", ".join(effects),
        )
    return effects


def _share_coefficients(graph: fx.Graph, node: fx.Node, shared: set[tuple]) -> None:
    """Replace one ``coeffs`` call by a call of the subgraph its computation shares; its
    coefficients are flattened after the call, as `pre` and `post_res` above read them. (The
    state goes in unflattened: an operand whose size is a product of symbols, ``B*T`` under
    dynamic shapes, fails Inductor's codegen of the subgraph's inputs.)"""
    x, *params, spec = node.args
    present = tuple(p is not None for p in params)
    key = (spec, present, str(node.meta[COEFFS_STATE]))
    # The identifier names the subgraph for AOTAutograd's and Inductor's caches beyond this
    # graph (checkpoint bodies, later graphs): the same name must mean the same function.
    name = "hcpass_coeffs_" + hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    if key not in shared:
        graph.owning_module.register_module(name, _coefficients_body(spec, present))
        shared.add(key)
    with graph.inserting_before(node):
        body = graph.get_attr(name)
        # The first site reads its input expanded (stride 0), the others a contiguous state:
        # a shared subgraph must see one layout.
        dense = graph.call_method("contiguous", (x,))
        operands = [dense, *(p for p in params if p is not None)]
        call = graph.call_function(_INVOKE_SUBGRAPH, (body, name, *operands))
        flat = graph.call_function(_flat_coefficients, (call,))
    node.replace_all_uses_with(flat)
    graph.erase_node(node)


def _flat_coefficients(coefficients: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, ...]:
    """``H_pre, H_post [*pos, n]``, ``H_res [*pos, n, n]`` -> ``[P, n]``, ``[P, n, n]``."""
    h_pre, h_post, h_res = coefficients
    return h_pre.flatten(0, -2), h_post.flatten(0, -2), h_res.flatten(0, -3)


def _coefficients_body(spec: str, present: tuple[bool, ...]) -> fx.GraphModule:
    """``(x, [phi, alpha,] bias) -> (H_pre, H_post, H_res)`` by the reference, for `spec`."""
    body = fx.Graph()
    x = body.placeholder("x")
    names = ("phi", "alpha", "bias")
    params = [body.placeholder(n) if keep else None for n, keep in zip(names, present, strict=True)]
    out = body.call_function(REFERENCE[_COEFFS], (x, *params, spec))
    body.output(tuple(body.call_function(operator.getitem, (out, i)) for i in range(3)))
    return fx.GraphModule(torch.nn.Module(), body, class_name="CoefficientsBody")
