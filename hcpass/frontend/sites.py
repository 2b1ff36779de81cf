"""Find the residual sites of a graph and group them into chains.

Input: an FX graph in torch IR (what Dynamo hands a backend) whose nodes carry
``meta["example_value"]``, and a function naming the graph's parameter placeholders.
Output: a `SiteAnalysis` -- the chains to rewrite and every same-shape add that was
skipped, with the reason.

Definitions (docs/how-it-works.md has pictures):
- a *stream value* belongs to a chain: the chain's input, the output of one of its sites,
  or a per-position op (post-norm, post-activation) applied to a stream value;
- a *site* is ``s + alpha * y`` where ``s`` is a stream value and the branch ``y`` is
  computed (through at least one parameterised op) from a stream value ``r`` of the same
  chain -- usually ``r = s``; for parallel blocks ``x + attn(h) + mlp(h)`` the second add
  reads ``r = x`` while adding to ``s = x + attn(h)``;
- an add whose branch reads a value it is not added to starts a new chain.
Sites are found in graph order, so each decision sees the chains formed before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from hcpass.patterns.node_sets import (
    MOVEDIMS,
    PERMUTES,
    TRANSPOSES,
    alias_path,
    aliases_input_or_view,
    calls_one_of,
    is_cast,
    is_channels_first,
    is_channels_last,
    is_convolution,
    is_stream_op,
    is_view,
    mutates_first_arg,
    target_name,
    written_through_views,
)
from hcpass.patterns.residual_add import AddMatch, match_residual_add
from hcpass.patterns.result import Match, Skip

ParamName = Callable[[fx.Node], "str | None"]
SiteFilter = Callable[["Site"], "str | None"]


@dataclass(frozen=True, eq=False)
class Site:
    """One residual add to rewrite: ``node = stream + alpha * branch``."""

    node: fx.Node
    stream: fx.Node
    branch: fx.Node
    read: fx.Node  # the stream value the branch reads
    alpha: float
    anchor: fx.Node  # the parameter placeholder the site's mixer is keyed on
    anchor_name: str
    branch_nodes: frozenset[fx.Node]  # nodes on the paths read -> branch, branch included
    channel_dim: int  # non-negative, in the stream tensor's own dims
    channels: int


@dataclass(eq=False)
class Chain:
    """Sites connected through their stream; `stream_ops` are lifted per-position ops."""

    input: fx.Node
    sites: list[Site] = field(default_factory=list)
    stream_ops: list[fx.Node] = field(default_factory=list)

    @property
    def stream_values(self) -> list[fx.Node]:
        """The chain input, site outputs and lifted ops, in graph order."""
        values = [self.input, *(s.node for s in self.sites), *self.stream_ops]
        order = {n: i for i, n in enumerate(self.input.graph.nodes)}
        return sorted(values, key=order.__getitem__)


# What `_classify` finds: a site, its chain (None: the site starts one), the stream ops to lift.
_Found = tuple[Site, Chain | None, list[fx.Node]]


@dataclass(frozen=True)
class Skipped:
    node: fx.Node
    reason: str


@dataclass
class SiteAnalysis:
    chains: list[Chain]
    skipped: list[Skipped]

    @property
    def sites(self) -> list[Site]:
        return [site for chain in self.chains for site in chain.sites]


def _tensor(node: object) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(
        statically_known_true(x == y) for x, y in zip(a.shape, b.shape, strict=True)
    )


class _Graph:
    """Index and ancestor bitsets of a graph (bit i set: node i is an ancestor)."""

    def __init__(self, graph: fx.Graph) -> None:
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.written_through_views = written_through_views(graph)
        self.ancestors: list[int] = []
        for node in self.nodes:
            bits = 0
            for parent in node.all_input_nodes:
                j = self.index[parent]
                bits |= self.ancestors[j] | (1 << j)
            self.ancestors.append(bits)

    def depends(self, node: fx.Node, on: fx.Node) -> bool:
        return bool(self.ancestors[self.index[node]] >> self.index[on] & 1)


def normalize_inplace(graph: fx.Graph) -> None:
    """Make readers that run after an in-place op read the op's result.

    Dynamo records ``x += y`` as ``iadd = operator.iadd(x, y)`` but leaves earlier aliases of
    ``x`` (a list of hidden states, say) pointing at ``x``; at run time they see the mutated
    tensor. Pointing them at ``iadd`` states that dependence in the graph, so the rewrite can
    replace the add without changing what they read. Skipped when ``x`` may alias another
    tensor; sites on such adds are then skipped too.
    """
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    for node in nodes:
        if not (mutates_first_arg(node) and node.args and isinstance(node.args[0], fx.Node)):
            continue
        target = node.args[0]
        if aliases_input_or_view(target):
            continue
        for user in list(target.users):
            if user is not node and position[user] > position[node]:
                user.replace_input_with(target, node)


def find_sites(
    graph: fx.Graph, param_name: ParamName, keep: SiteFilter | None = None
) -> SiteAnalysis:
    """Find the residual chains of `graph` (run `normalize_inplace` on it first).

    `param_name` names parameter placeholders (None for other nodes); `keep` may veto a
    site by returning a reason (the runtime uses it to rewrite only sites that have a mixer).
    """
    g = _Graph(graph)
    chain_of: dict[fx.Node, Chain] = {}  # stream value -> its chain
    chains: list[Chain] = []
    skipped: list[Skipped] = []
    anchors = _Anchors(param_name, taken=set(), nested=set())

    for node in g.nodes:
        found = match_residual_add(node)
        if found is None:
            continue
        a, b = _tensor(found.lhs), _tensor(found.rhs)
        if a is None or b is None or not _same_shape(a, b) or not _compatible_dtypes(a, b):
            continue  # broadcasting adds (biases, masks, epsilons) are not candidates
        outcome = _classify(g, node, found, chain_of, anchors)
        if isinstance(outcome, Skip):
            skipped.append(Skipped(node, outcome.reason))
            continue
        site, chain, lifted = outcome.value
        anchors.taken.add(site.anchor_name)
        anchors.nested.update(site.branch_nodes)
        veto = keep(site) if keep is not None else None
        if veto is not None:
            skipped.append(Skipped(node, veto))
            continue
        if chain is None:
            # A new chain starts at the value its first branch reads; casts between that
            # value and the add (a residual kept in fp32) are its first stream ops.
            chain = Chain(input=site.read)
            chain_of[site.read] = chain
            chains.append(chain)
        for op in lifted:
            chain.stream_ops.append(op)
            chain_of[op] = chain
        chain.sites.append(site)
        chain_of[node] = chain
    return SiteAnalysis(chains, skipped)


def _compatible_dtypes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, or two floating dtypes: under autocast an fp32 stream meets a bf16 branch,
    and a residual kept in fp32 meets a branch computed in the model's dtype."""
    return a.dtype == b.dtype or (a.is_floating_point() and b.is_floating_point())


def _cast_read(g: _Graph, stream: fx.Node, branch: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The value the branch reads among `stream` and the values it is a dtype cast of
    (nearest first), with the casts from that value to `stream` in graph order."""
    casts: list[fx.Node] = []
    value = stream
    while not (value is branch or g.depends(branch, value)):
        if not (is_cast(value) and value.args and isinstance(value.args[0], fx.Node)):
            return None
        casts.append(value)
        value = value.args[0]
    return value, casts[::-1]


def _stream_origin(
    g: _Graph, value: fx.Node, chain_of: dict[fx.Node, Chain]
) -> tuple[Chain, list[fx.Node]] | None:
    """The chain `value` belongs to, possibly through per-position ops to lift."""
    path: list[fx.Node] = []
    current = value
    while current not in chain_of:
        if not (is_stream_op(current) and current.args and isinstance(current.args[0], fx.Node)):
            return None
        path.append(current)
        current = current.args[0]
    chain = chain_of[current]
    for op in path:
        if not _liftable(g, op, chain):
            return None
    return chain, path[::-1]


def _liftable(g: _Graph, op: fx.Node, chain: Chain) -> bool:
    """A per-position op on the stream can run on all streams folded into the batch when
    its other tensor inputs don't read the chain and don't broadcast over the batch."""
    stream = _tensor(op.args[0])
    out = _tensor(op)
    if stream is None or out is None or not _same_shape(stream, out):
        return False
    for other in op.all_input_nodes[1:]:
        value = _tensor(other)
        if value is None:
            continue
        if any(g.depends(other, v) or other is v for v in chain.stream_values):
            return False
        if value.dim() >= stream.dim() and not statically_known_true(value.shape[0] == 1):
            return False
    return True


def _classify(
    g: _Graph,
    node: fx.Node,
    found: AddMatch,
    chain_of: dict[fx.Node, Chain],
    anchors: _Anchors,
) -> Match[_Found] | Skip:
    """A site (with its chain, None for a new one, and stream ops to lift) or a skip reason."""
    lhs, rhs = found.lhs, found.rhs
    # 1. Continue a chain: one operand is a stream value, the other reads that chain.
    for stream, branch in ((lhs, rhs), (rhs, lhs)):
        origin = _stream_origin(g, stream, chain_of)
        if origin is None:
            continue
        chain, lifted = origin
        values = chain.stream_values + lifted
        read = next((v for v in reversed(values) if v is branch or g.depends(branch, v)), None)
        if read is None:
            continue
        return _build(g, node, found, stream, branch, read, anchors, chain, lifted)
    # 2. Start a chain: the branch is computed from the other operand, or from the value
    # that operand is a dtype cast of (``residual = x.to(torch.float32)``; Mamba).
    for stream, branch in ((lhs, rhs), (rhs, lhs)):
        if g.depends(branch, stream):
            # Chains `stream` entered through a branch only (its values are added into
            # them); a chain computed from `stream` itself (inside this site's branch) is
            # part of the branch.
            entered = {
                chain
                for value, chain in chain_of.items()
                if g.depends(value, stream)
                and not (chain.input is stream or g.depends(chain.input, stream))
            }
            through = [value for value, chain in chain_of.items() if chain in entered]
            if through and not _reads_avoiding(g, branch, stream, set(through)):
                return Skip(
                    f"the branch reads {stream.name!r} only through the stream of another "
                    f"chain ({through[0].name!r}): not a residual of it (e.g. an attention "
                    "bias computed once and added to every layer's scores)"
                )
            return _build(g, node, found, stream, branch, stream, anchors, None, [])
    for stream, branch in ((lhs, rhs), (rhs, lhs)):
        cast = _cast_read(g, stream, branch)
        if cast is not None:
            read, casts = cast
            return _build(g, node, found, stream, branch, read, anchors, None, casts)
    for stream, branch in ((lhs, rhs), (rhs, lhs)):
        source = stream.args[0] if is_view(stream) and stream.args else None
        if isinstance(source, fx.Node) and g.depends(branch, source):
            return Skip(
                f"the stream operand is {target_name(stream)}() of the value the branch "
                "reads, not that value: a residual across a view, reshape or detach is not "
                "rewritten"
            )
    shared = [v for v in chain_of if g.depends(lhs, v) and g.depends(rhs, v)]
    if shared:
        return Skip(
            f"both operands are computed from stream {shared[-1].name!r} but neither is "
            "the stream (a projection shortcut, which ends the chain, or an add inside a branch)"
        )
    common = [n for n in g.nodes if g.depends(lhs, n) and g.depends(rhs, n)]
    if common:
        return Skip(
            f"neither operand is computed from the other (both read {common[-1].name!r}): "
            "not a residual"
        )
    if not any(_reads_parameters(g, operand, anchors.param_name) for operand in (lhs, rhs)):
        return Skip(
            "the operands share no input in this graph, both come from its inputs: a sum "
            "of two inputs, or a residual whose branch spans a graph break (the report's "
            "graph breaks say where Dynamo split the forward)"
        )
    return Skip("the operands share no input (not a residual: e.g. an embedding sum)")


def _reads_avoiding(g: _Graph, node: fx.Node, value: fx.Node, cut: set[fx.Node]) -> bool:
    """Whether `node` is computed from `value` along a path through none of the `cut` nodes."""
    stack, seen = [node], set()
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent is value:
                return True
            if parent in cut or parent in seen or not g.depends(parent, value):
                continue
            seen.add(parent)
            stack.append(parent)
    return False


def _reads_parameters(g: _Graph, operand: fx.Node, param_name: ParamName) -> bool:
    return any(
        n.op == "placeholder" and param_name(n) is not None
        for n in g.nodes
        if n is operand or g.depends(operand, n)
    )


def _build(
    g: _Graph,
    node: fx.Node,
    found: AddMatch,
    stream: fx.Node,
    branch: fx.Node,
    read: fx.Node,
    anchors: _Anchors,
    chain: Chain | None,
    lifted: list[fx.Node],
) -> Match[_Found] | Skip:
    if stream is found.rhs and found.alpha != 1.0:
        return Skip(f"torch.add(..., alpha={found.alpha}) scales the stream, not the branch")
    if found.inplace and aliases_input_or_view(found.lhs):
        return Skip("in-place add mutates a graph input or a view")
    if any(alias_path(n)[-1] in g.written_through_views for n in (stream, read, *lifted)):
        return Skip(
            "the stream is also written in place through a view or by item assignment "
            "(x[..., :k] += y, x[i] = y): the rewrite cannot order its reads of the streams "
            "with that write"
        )
    value = _tensor(stream)
    wrapped = next((t for t in (value, _tensor(branch)) if is_traceable_wrapper_subclass(t)), None)
    if wrapped is not None:
        return Skip(
            f"the residual is a {type(wrapped).__name__}, and the mixer ops take plain "
            "tensors: tensor parallelism that keeps the stream distributed (sequence "
            "parallelism, use_local_output=False) is not supported. Parallelize so that "
            "each block returns a plain tensor (ColwiseParallel/RowwiseParallel with their "
            "default use_local_output=True)"
        )
    if value.dim() < 2:
        return Skip("stream has no batch dimension (rank < 2)")
    if branch is read:
        return Skip("adds two values of one stream (no branch in between)")
    branch_nodes = frozenset(
        n
        for i, n in enumerate(g.nodes[: g.index[branch] + 1])
        if (n is branch or g.ancestors[g.index[branch]] >> i & 1) and g.depends(n, read)
    )
    anchor = anchors.choose(g, branch_nodes)
    if isinstance(anchor, Skip):
        return anchor
    channel_dim = _channel_dim(g, read, branch_nodes, value.dim())
    channels = value.shape[channel_dim]
    if isinstance(channels, torch.SymInt) and channels.node.has_hint():
        # Under dynamic=True every size is symbolic; a mixer has a fixed width, so the
        # channel count is specialised (Dynamo guards on it and recompiles for another).
        channels = int(channels)
    if not isinstance(channels, int):
        return Skip(f"channel dimension {channel_dim} is dynamic ({channels})")
    site = Site(
        node=node,
        stream=stream,
        branch=branch,
        read=read,
        alpha=found.alpha if stream is found.lhs else 1.0,
        anchor=anchor.value,
        anchor_name=anchors.param_name(anchor.value),
        branch_nodes=branch_nodes,
        channel_dim=channel_dim,
        channels=channels,
    )
    return Match((site, chain, lifted))


def _channel_dim(g: _Graph, read: fx.Node, branch_nodes: frozenset[fx.Node], rank: int) -> int:
    """The stream dimension the branch takes as its channels: the one that the first op
    acting on channels (`CHANNELS_FIRST`, `CHANNELS_LAST`) reached from `read` sees there,
    followed through shape-keeping ops and dimension reorders.

    Which ops the branch holds is not enough: Mamba's mixer applies a depthwise conv1d, but
    to ``in_proj(norm(x)).transpose(1, 2)``: its channels are the stream's last dimension,
    and dimension 1 is the sequence. A branch where no such op is reached falls back on its
    ops: NCHW if it has a convolution, else channels last."""
    # For each value computed from `read`: which stream dimension each of its dims is.
    dims: dict[fx.Node, tuple[int | None, ...]] = {read: tuple(range(rank))}
    for node in sorted(branch_nodes, key=g.index.__getitem__):
        source = next((p for p in node.all_input_nodes if p in dims), None)
        if source is None:
            continue
        position = 1 if is_channels_first(node) else -1 if is_channels_last(node) else None
        if position is not None:
            first = node.args[0] if node.args else None
            seen = dims.get(first) if isinstance(first, fx.Node) else None
            found = seen[position] if seen is not None and len(seen) > 1 else None
            if found is not None:
                return found
            continue
        reordered = _reorder(node, dims[source])
        if reordered is not None:
            dims[node] = reordered
            continue
        before, after = _tensor(source), _tensor(node)
        if before is not None and after is not None and _same_shape(before, after):
            dims[node] = dims[source]
    convolutional = any(is_convolution(n) for n in branch_nodes)
    return 1 if convolutional else rank - 1


def _reorder(node: fx.Node, dims: tuple[int | None, ...]) -> tuple[int | None, ...] | None:
    """`dims` after `node` if it transposes, permutes or moves dimensions, else None."""
    args = node.args[1:]
    if not all(isinstance(a, int) for a in _flat(args)):
        return None
    order = list(range(len(dims)))
    if calls_one_of(node, TRANSPOSES) and len(args) == 2:
        a, b = (d % len(dims) for d in args)
        order[a], order[b] = order[b], order[a]
    elif calls_one_of(node, PERMUTES):
        order = [d % len(dims) for d in _flat(args)]
    elif calls_one_of(node, MOVEDIMS) and len(args) == 2:
        source, destination = (d % len(dims) for d in args)
        order.remove(source)
        order.insert(destination, source)
    else:
        return None
    if sorted(order) != list(range(len(dims))):
        return None
    return tuple(dims[d] for d in order)


def _flat(args: tuple) -> list:
    return [x for a in args for x in (a if isinstance(a, (list, tuple)) else (a,))]


@dataclass(frozen=True)
class _Anchors:
    """Chooses the parameter a site's mixer is keyed on (and named after).

    The parameter read closest to the branch output, outside the branches of sites found
    earlier (a residual nested inside this branch names its own mixer) and not taken by an
    earlier site (the second call of a weight-shared block gets a mixer of its own)."""

    param_name: ParamName
    taken: set[str]
    nested: set[fx.Node]

    def choose(self, g: _Graph, branch_nodes: frozenset[fx.Node]) -> Match[fx.Node] | Skip:
        read_any = False
        own = [n for n in branch_nodes if n not in self.nested] or list(branch_nodes)
        for node in sorted(own, key=g.index.__getitem__, reverse=True):
            for parent in node.all_input_nodes:
                name = self.param_name(parent)
                if name is None:
                    continue
                read_any = True
                if name not in self.taken:
                    return Match(parent)
        if read_any:
            return Skip("every parameter of its branch already keys another site's mixer")
        return Skip("branch reads no parameters (an elementwise expression, not a block)")
