"""CPU lowering: the mixer ops become plain PyTorch that Inductor compiles.

Every site does the same mixer work: its entry (``coeffs`` and the ``pre`` that reads its
H_pre) and its merge (``post_res``). Inlined at every site, that work would be traced,
partitioned, lowered and scheduled again per site, and a converted model's cold compile would
grow much faster per layer than the plain model's. Instead it goes into subgraphs called
through PyTorch's ``invoke_subgraph`` higher-order op (what
``torch.compiler.nested_compile_region`` records), which AOTAutograd traces once and Inductor
compiles once however many sites call them (`_SharedSubgraphs`): a chain's first entry, each
boundary between two sites (a merge, then the next site's entry on the merged state: the
grouping `FuseAcrossSites` gives the CUDA kernels) and the chain's last merge. A site adds a
call and a few getitems to the graph. Inside, Inductor fuses the boundary's merge with the
new state's norm; what a subgraph gives up is fusing with the branch's first and last ops
(docs/performance.md has the cost). Sinkhorn's iterations are one op, `hcpass::sinkhorn`
(unrolled, one site's coefficients would be hundreds of FX nodes).

Not shared, and lowered inline: a site whose state is a channels-last view of an NCHW stream
(conv nets; the layout Inductor picks for that view is not one a shared subgraph can be
traced for), and coefficients that call an op with side effects (`_side_effects`), with the
stream ops that read them. Inline, the references run on states whose positions are
flattened into one dimension (``x[n, P, C]``) and the coefficients stay flat between a site's
ops. Why flat: a conv net's per-position tensors would otherwise be 4-D ``[B, H, W, k]``
(``H_pre``, the projection's logits), and Inductor treats every 4-D tensor next to a
convolution as an NCHW activation: its layout optimisation gives a saved one channels-last
strides computed from ``(B, H, W, k)``, which under dynamic shapes it cannot order (``1 <
H`` undecided), so training at a second input size would fail. Flat, they have at most one
symbolic dimension.

A shared subgraph needs `hcpass.lowering.passes.subgraph_aliases` under Inductor (the backend
adds it): Inductor may reuse the buffer of a subgraph's operand once the call is its last
visible use, even when the partitioned subgraph returned that operand as a tensor saved for
backward; that pass has the callers read the operand itself.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import operator
from collections.abc import Callable

import torch
from torch import Tensor, fx

from hcpass.lowering.passes.graph_pass import GraphPass, count
from hcpass.lowering.passes.save_stream_states import tag_stream_state
from hcpass.manifolds import resolve
from hcpass.manifolds.base import compute_dtype
from hcpass.ops import REFERENCE
from hcpass.rewrite.chains import COEFFS_STATE, MERGE_STATE

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
    u = REFERENCE[_ops.pre.default](_flat(x), h_pre.flatten(0, -2))
    return u.view(x.shape[1:])


def post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    out = REFERENCE[_ops.post_res.default](
        _flat(x), y.flatten(0, -2), h_post.flatten(0, -2), h_res.flatten(0, -3)
    )
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
    """`share=False` inlines every site's mixer work (the backend's fallback where
    AOTAutograd cannot partition a shared subgraph)."""

    def __init__(self, share: bool = True) -> None:
        self.share = share

    def __call__(self, graph: fx.Graph) -> None:
        shared = _SharedSubgraphs(graph)
        for node in list(graph.nodes):
            if node in shared.erased:  # an entry lowered with the merge before it
                continue
            if (
                self.share
                and node.op == "call_function"
                and node.target is _COEFFS
                and _shareable(node)
            ):
                shared.site_entry(node)
            elif self.share and node.op == "call_function" and shared.can_merge(node):
                shared.merge(node)
            elif node.op == "call_function" and node.target in LOWERED:
                count("mixer_ops_inlined")
                node.target = LOWERED[node.target]
                if node.target in (post_res, post_res_coeffs_pre):
                    tag_stream_state(node)
            elif node.op == "call_function" and node.target in REFERENCE:
                count("mixer_ops_inlined")
                node.target = REFERENCE[node.target]  # Attention Residuals
            elif node.op == "get_attr" and graph.owning_module is not None:
                # Activation-checkpoint bodies hold mixer ops too (hcpass.rewrite.regions).
                # Inlined there: AOTAutograd's recompute of a shared subgraph inside a
                # checkpoint region gave a site's phi a wrong gradient (torch 2.13; relative
                # error 1 to 37x, tests/end_to_end/test_checkpoint.py).
                body = operator.attrgetter(node.target)(graph.owning_module)
                if isinstance(body, fx.GraphModule):
                    LowerToReference(share=False)(body.graph)
                    body.recompile()


def _shareable(node: fx.Node) -> bool:
    """Whether a coeffs node's entry -- it and the pre that reads its H_pre -- can be shared."""
    if COEFFS_STATE not in node.meta or _entry_pre(node) is None:
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


class _SharedSubgraphs:
    """The shared subgraphs of one graph and the calls that replace its mixer ops.

    A chain's first site's entry -- ``coeffs`` and the ``pre`` that reads its H_pre --
    becomes one call, ``(x, [phi, alpha,] bias) -> (H_post, H_res, u)`` (H_pre is read only
    inside). Each boundary between two sites -- site l's merge ``post_res`` and site l+1's
    entry on the merged state -- becomes another, ``(x, y, H_post, H_res, [phi', alpha',]
    bias') -> (X', H_post', H_res', u')``: the merged state is read back from the kernel that
    writes it, and its gradient from both sites is summed inside the boundary's backward. A
    merge with no entry after it (the chain's last) is a call ``(x, y, H_post, H_res) ->
    (X',)``. Merges are shared where their coefficients come from a shared call. Every call
    of one subgraph passes dense operands (the first site reads its input expanded to n
    streams, stride 0; a subgraph is traced for one layout), and the coefficients stay
    ``[*pos, n]`` between calls: flattened, an operand whose size is a product of symbols
    (``B*T`` under dynamic shapes) fails Inductor's codegen of the subgraph's inputs.
    """

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.position = {node: i for i, node in enumerate(graph.nodes)}
        self.erased: set[fx.Node] = set()
        self.registered: set[str] = set()
        self.dense: dict[fx.Node, fx.Node] = {}
        # coefficient outputs of shared calls: [*pos, n] (not flat) and dense
        self.coefficients: dict[fx.Node, torch.dtype] = {}

    def site_entry(self, node: fx.Node) -> None:
        x, *params, spec = node.args
        present = tuple(p is not None for p in params)
        body = functools.partial(_entry_body, spec, present)
        operands = [self._dense(x, node), *(p for p in params if p is not None)]
        outputs = self._call(node, ("entry", *_entry_key(node)), body, operands, 3)
        self._replace_entry(node, _entry_pre(node), outputs)

    def can_merge(self, node: fx.Node) -> bool:
        return (
            node.target is _ops.post_res.default
            and MERGE_STATE in node.meta
            and all(h in self.coefficients for h in node.args[2:])
        )

    def merge(self, node: fx.Node) -> None:
        x, y, h_post, h_res = node.args
        shape, dtype = node.meta[MERGE_STATE]
        key = ("merge", str(shape), str(dtype), str(self.coefficients[h_post]))
        operands = [self._dense(x, node), self._dense(y, node), h_post, h_res]
        entry = self._next_entry(node)
        if entry is None:
            (out,) = self._call(node, key, _merge_body, operands, 1)
        else:
            _, *params, spec = entry.args
            present = tuple(p is not None for p in params)
            key = ("boundary", *key, *_entry_key(entry))
            body = functools.partial(_boundary_body, spec, present)
            operands += [p for p in params if p is not None]
            out, *outputs = self._call(node, key, body, operands, 4)
            self._replace_entry(entry, _entry_pre(entry), outputs)
        node.replace_all_uses_with(out)
        self.graph.erase_node(node)

    def _next_entry(self, merge: fx.Node) -> fx.Node | None:
        """The shareable entry (coeffs with its pre) on `merge`'s state, if one can move up to
        the merge: its parameters are defined before it."""
        for user in merge.users:
            if (
                user.target is _COEFFS
                and user.args[0] is merge
                and _shareable(user)
                and all(
                    self.position.get(p, len(self.position)) < self.position[merge]
                    for p in user.args[1:-1]
                    if p is not None
                )
            ):
                return user
        return None

    def _replace_entry(self, node: fx.Node, pre_node: fx.Node, outputs: list[fx.Node]) -> None:
        """Point the readers of an entry's H_post, H_res and branch input at `outputs`; its
        H_pre's only reader is `pre_node`, replaced with it."""
        h_post, h_res, u = outputs
        pre_node.replace_all_uses_with(u)
        self._erase(pre_node)
        replacement = {1: h_post, 2: h_res}
        for getitem in [user for user in node.users if user.target is operator.getitem]:
            if getitem.args[1] in replacement:  # H_pre's lost its only reader above
                getitem.replace_all_uses_with(replacement[getitem.args[1]])
            self._erase(getitem)
        self._erase(node)
        for h in (h_post, h_res):
            self.coefficients[h] = compute_dtype(node.meta[COEFFS_STATE][1])

    def _erase(self, node: fx.Node) -> None:
        self.graph.erase_node(node)
        self.erased.add(node)

    def _dense(self, value: fx.Node, before: fx.Node) -> fx.Node:
        if value not in self.dense:
            with self.graph.inserting_before(before):
                self.dense[value] = self.graph.call_method("contiguous", (value,))
        return self.dense[value]

    def _call(
        self,
        node: fx.Node,
        key: tuple[str, ...],
        body: Callable[[], fx.GraphModule],
        operands: list[fx.Node],
        outputs: int,
    ) -> list[fx.Node]:
        # The identifier names the subgraph for AOTAutograd's and Inductor's caches beyond
        # this graph (checkpoint bodies, later graphs): the same name must mean the same
        # function of operands of the same shapes and dtypes.
        name = f"hcpass_{key[0]}_" + hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        if name not in self.registered:
            self.graph.owning_module.register_module(name, body())
            self.registered.add(name)
        count(f"shared_{key[0]}_calls")  # entry, boundary, merge
        with self.graph.inserting_before(node):
            attr = self.graph.get_attr(name)
            call = self.graph.call_function(_INVOKE_SUBGRAPH, (attr, name, *operands))
            return [self.graph.call_function(operator.getitem, (call, i)) for i in range(outputs)]


def _entry_pre(coeffs: fx.Node) -> fx.Node | None:
    """The ``pre`` that is the only reader of `coeffs`'s H_pre, on the same state, if any."""
    readers = [
        reader
        for getitem in coeffs.users
        if getitem.target is operator.getitem and getitem.args[1] == 0
        for reader in getitem.users
    ]
    if len(readers) == 1 and readers[0].target is _ops.pre.default:
        if readers[0].args[0] is coeffs.args[0]:
            return readers[0]
    return None


def _entry_key(coeffs: fx.Node) -> tuple[str, ...]:
    """What makes two sites' coefficients the same function of the same operands."""
    _, *params, spec = coeffs.args
    shape, dtype = coeffs.meta[COEFFS_STATE]
    return spec, str(tuple(p is not None for p in params)), str(shape), str(dtype)


def _entry(x: Tensor, phi: Tensor | None, alpha: Tensor | None, bias: Tensor, manifold: str):
    h_pre, h_post, h_res = REFERENCE[_COEFFS](x, phi, alpha, bias, manifold)
    return h_post, h_res, pre(x, h_pre)


def _merge(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> tuple[Tensor]:
    return (post_res(x, y, h_post, h_res),)


def _boundary(x, y, h_post, h_res, phi, alpha, bias, manifold: str):
    out = post_res(x, y, h_post, h_res)
    return (out, *_entry(out, phi, alpha, bias, manifold))


def _body(function: Callable, inputs: tuple[str, ...], outputs: int, *constants) -> fx.GraphModule:
    """A graph ``(*inputs) -> function(*inputs, *constants)`` of `outputs` tensors."""
    body = fx.Graph()
    args = [body.placeholder(n) if n else None for n in inputs]
    out = body.call_function(function, (*args, *constants))
    body.output(tuple(body.call_function(operator.getitem, (out, i)) for i in range(outputs)))
    return fx.GraphModule(torch.nn.Module(), body, class_name="SharedBody")


def _parameters(present: tuple[bool, ...]) -> tuple[str, ...]:
    return tuple(
        n if keep else "" for n, keep in zip(("phi", "alpha", "bias"), present, strict=True)
    )


def _entry_body(spec: str, present: tuple[bool, ...]) -> fx.GraphModule:
    """``(x, [phi, alpha,] bias) -> (H_post, H_res, u)``."""
    return _body(_entry, ("x", *_parameters(present)), 3, spec)


def _boundary_body(spec: str, present: tuple[bool, ...]) -> fx.GraphModule:
    """``(x, y, H_post, H_res, [phi, alpha,] bias) -> (X', H_post', H_res', u')``."""
    inputs = ("x", "y", "h_post", "h_res", *_parameters(present))
    return _body(_boundary, inputs, 4, spec)


def _merge_body() -> fx.GraphModule:
    """``(x, y, H_post, H_res) -> (X',)``."""
    return _body(_merge, ("x", "y", "h_post", "h_res"), 1)
