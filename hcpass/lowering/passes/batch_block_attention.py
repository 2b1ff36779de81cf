"""CUDA lowering: Block Attention Residuals' phase 1 once per block, for all its queries.

In Block AttnRes every site of a block attends over the same completed blocks ``b_0..b_n``
and a partial block of its own (`hcpass.rewrite.attnres`):

    h_s = hcpass.attnres([b_0, ..., b_n, p_s], w_s, eps)        s = 1..S

The paper's split computes the part over the completed blocks once for the S queries
(`hcpass.ops.attnres.reference` has the math):

    o, lse = hcpass.attnres_blocks([b_0, ..., b_n], stack([w_1, ..., w_S]), eps)
    h_s    = hcpass.attnres_merge(o[s], lse[s], p_s, w_s, eps)

so each block is read once per block of sites instead of once per site. This pass groups
the ``hcpass.attnres`` calls whose completed blocks (``values[:-1]``, the same nodes) and eps
are the same; for each group of two or more it inserts one ``attnres_blocks`` where the
blocks and queries are all available (the block boundary), and replaces each call by its
``attnres_merge``.

The calls live in activation-checkpoint bodies (the rewrite gives each depth attention a
region of its own): phase 1 runs in the outer graph, and each region's checkpoint call takes
its ``o[s]`` and ``lse[s]`` as two more operands (placeholders of the body), while the blocks
it no longer reads leave its operands. So the backward recomputes only the merge; phase 1's
o and lse are saved (o is S times the activation size, in fp32: docs/performance.md).

Left as they are, with the reason in the log and counted (``attnres_unbatched``): a group
whose blocks or queries are computed inside a checkpoint body, whose body is called more than
once, or where no place in the graph comes after all the blocks and queries and before the
first call. Calls in other subgraphs than checkpoint bodies are not looked at.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
from torch import fx

from hcpass.frontend.regions import is_checkpoint
from hcpass.lowering.passes.graph_pass import GraphPass, count

log = logging.getLogger(__name__)

_ATTNRES = torch.ops.hcpass.attnres.default
_BLOCKS = torch.ops.hcpass.attnres_blocks.default
_MERGE = torch.ops.hcpass.attnres_merge.default


@dataclass(frozen=True)
class _Member:
    """One ``hcpass.attnres`` call over two or more values."""

    node: fx.Node  # the call, in the outer graph or in a checkpoint body
    call: fx.Node  # where it runs in the outer graph: the node itself or its checkpoint call
    body: fx.GraphModule | None  # the checkpoint body holding it
    blocks: tuple[fx.Node, ...]  # values[:-1], as outer nodes where the body reads them
    query: fx.Node
    eps: float

    def outer(self, node: fx.Node) -> bool:
        return node.graph is self.call.graph


class BatchBlockAttention(GraphPass):
    def __call__(self, graph: fx.Graph) -> None:
        groups: dict[tuple, list[_Member]] = {}
        for member in _members(graph):
            groups.setdefault((member.blocks, member.eps), []).append(member)
        batched, unbatched = 0, []
        for (blocks, _), members in groups.items():
            if len(members) < 2:
                continue
            reason = _why_not(graph, members)
            if reason is not None:
                unbatched.append(f"over {[b.name for b in blocks]}: {reason}")
                continue
            _batch(graph, members)
            batched += 1
        count("attnres_batched", batched)
        count("attnres_unbatched", len(unbatched))
        if batched or unbatched:
            log.info(
                "hcpass: batched phase 1 of %d of %d Attention Residuals blocks%s",
                batched,
                batched + len(unbatched),
                "".join(f"\n  not batched {line}" for line in unbatched),
            )


def _members(graph: fx.Graph) -> list[_Member]:
    """Every attnres call over >= 2 values in `graph` and in its checkpoint bodies, with
    what a body reads resolved to the outer node that its checkpoint call passes in."""
    members = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _ATTNRES:
            members.extend(_member(node, node, None, {}))
        elif is_checkpoint(node) and _body_attr(node) and graph.owning_module is not None:
            body = operator.attrgetter(_body_attr(node))(graph.owning_module)
            placeholders = body.graph.find_nodes(op="placeholder")
            outer = dict(zip(placeholders, node.args[1:], strict=True))
            for inner in body.graph.find_nodes(op="call_function", target=_ATTNRES):
                members.extend(_member(inner, node, body, outer))
    return members


def _member(
    node: fx.Node, call: fx.Node, body: fx.GraphModule | None, outer: dict[fx.Node, fx.Node]
) -> list[_Member]:
    if len(node.args) != 3 or not isinstance(node.args[0], (list, tuple)):
        return []  # not as the rewrite writes it
    values, query, eps = node.args
    if len(values) < 2:
        return []
    blocks = tuple(outer.get(v, v) for v in values[:-1])
    return [_Member(node, call, body, blocks, outer.get(query, query), eps)]


def _why_not(graph: fx.Graph, members: list[_Member]) -> str | None:
    """Why the group cannot share one phase 1 (None: it can)."""
    for member in members:
        if not all(member.outer(n) for n in (*member.blocks, member.query)):
            return f"{member.node.name} reads a block or its query computed inside its region"
        if member.body is not None and _calls_of(member.call) != 1:
            return f"the checkpoint body of {member.node.name} is called more than once"
    order = {node: i for i, node in enumerate(graph.nodes)}
    inputs = [*members[0].blocks, *(m.query for m in members)]
    first = min((m.call for m in members), key=order.__getitem__)
    if max(order[n] for n in inputs) >= order[first]:
        return f"a query is computed after {first.name}, the first call that reads the blocks"
    return None


def _body_attr(call: fx.Node) -> str | None:
    """The attribute holding the body a checkpoint call runs (None if not a ``get_attr``)."""
    body = call.args[0]
    return body.target if isinstance(body, fx.Node) and body.op == "get_attr" else None


def _calls_of(call: fx.Node) -> int:
    """How many nodes of the outer graph call the body that `call` calls."""
    target = _body_attr(call)
    return sum(1 for n in call.graph.nodes if is_checkpoint(n) and _body_attr(n) == target)


def _batch(graph: fx.Graph, members: list[_Member]) -> None:
    """One phase 1 after the last of the blocks and queries (after the placeholders), each
    member replaced by its merge."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    inputs = [*members[0].blocks, *(m.query for m in members)]
    last = max([*inputs, *graph.find_nodes(op="placeholder")], key=order.__getitem__)
    eps = members[0].eps
    with graph.inserting_after(last):
        queries = graph.call_function(torch.stack, ([m.query for m in members],))
    with graph.inserting_after(queries):
        phase_one = graph.call_function(_BLOCKS, (list(members[0].blocks), queries, eps))
    with graph.inserting_after(phase_one):
        o = graph.call_function(operator.getitem, (phase_one, 0))
    with graph.inserting_after(o):
        lse = graph.call_function(operator.getitem, (phase_one, 1))
    for index, member in enumerate(members):
        with graph.inserting_before(member.call):
            o_s = graph.call_function(torch.select, (o, 0, index))
            lse_s = graph.call_function(torch.select, (lse, 0, index))
        if member.body is None:
            _merge(member.node, o_s, lse_s)
        else:
            _merge_in_body(member, o_s, lse_s)


def _merge(node: fx.Node, o: fx.Node, lse: fx.Node) -> None:
    """Replace the attnres call `node` by the merge of (o, lse) with its partial block."""
    values, query, eps = node.args
    with node.graph.inserting_before(node):
        merge = node.graph.call_function(_MERGE, (o, lse, values[-1], query, eps))
    merge.meta = dict(node.meta)
    node.replace_all_uses_with(merge)
    node.graph.erase_node(node)


def _merge_in_body(member: _Member, o: fx.Node, lse: fx.Node) -> None:
    """The body takes (o, lse) as two new inputs and merges them; the inputs it read only for
    the blocks leave the body and its call."""
    body, call = member.body.graph, member.call
    read = member.node.all_input_nodes
    placeholders = body.find_nodes(op="placeholder")
    with body.inserting_after(placeholders[-1]):
        o_in = body.placeholder(f"{member.node.name}_o")
    with body.inserting_after(o_in):
        lse_in = body.placeholder(f"{member.node.name}_lse")
    _merge(member.node, o_in, lse_in)
    operands = []
    for placeholder, operand in zip(placeholders, call.args[1:], strict=True):
        if placeholder in read and not placeholder.users:
            body.erase_node(placeholder)
        else:
            operands.append(operand)
    call.args = (call.args[0], *operands, o, lse)
    member.body.recompile()
