"""CUDA lowering: fuse the boundary between consecutive sites of a residual chain.

Where site l's merge ``X' = post_res(x, y, H_post, H_res)`` feeds site l+1 directly,

    X'                 = hcpass.post_res(x, y, H_post, H_res)
    H_pre', H_post', H_res' = hcpass.coeffs(X', phi, alpha, bias, spec)
    u'                 = hcpass.pre(X', H_pre')

becomes one ``hcpass.post_res_coeffs_pre`` whose kernel computes the coefficients from the
merge's registers, so X' is read back once (for u') instead of twice (coeffs, pre). Its
backward is the three ops' backward ops, so training sees the same gradients.

The boundary is declared in `hcpass.patterns.site_boundary`; this pass matches it after each
merge, checks there is a place for the fused op, and replaces the nodes. Not fused, and left
as they are: what the pattern does not match (a chain's first site, a site whose stream
passes through a per-stream op first), and a boundary where no place in the graph comes after
the coefficients' parameters and before every reader of the merge. The log says which, for
each merge. Inside activation-checkpoint regions, each region's body is fused on its own.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from hcpass.lowering.passes.graph_pass import GraphPass, count
from hcpass.patterns.result import Skip
from hcpass.patterns.site_boundary import SITE_BOUNDARY, SiteBoundary

log = logging.getLogger(__name__)

_OPS = torch.ops.hcpass


class FuseAcrossSites(GraphPass):
    def __call__(self, graph: fx.Graph) -> None:
        for node in graph.find_nodes(op="get_attr") if graph.owning_module else ():
            # Activation-checkpoint bodies hold whole sites (hcpass.rewrite.regions): their
            # boundaries fuse inside the body; a boundary between two regions cannot.
            body = operator.attrgetter(node.target)(graph.owning_module)
            if isinstance(body, fx.GraphModule):
                self(body.graph)
                body.recompile()
        merges = SITE_BOUNDARY.roots(graph)
        unfused = []
        for merge in merges:
            found = SITE_BOUNDARY.match(merge, where=_placeable)
            if isinstance(found, Skip):
                unfused.append(f"{merge.name}: {found.reason}")
                continue
            _fuse(graph, found.value, _placement(found.value))
        count("site_boundaries_fused", len(merges) - len(unfused))
        count("site_boundaries_unfused", len(unfused))
        if merges:
            log.info(
                "hcpass: fused %d of %d site boundaries into post_res_coeffs_pre%s",
                len(merges) - len(unfused),
                len(merges),
                "".join(f"\n  not fused after {line}" for line in unfused),
            )


def _placeable(boundary: SiteBoundary) -> Skip | None:
    """Turns down a boundary the fused op has no place for (checked during the match, so a
    merge read by two sites' coefficients may fuse with the second if not the first)."""
    if _placement(boundary) is None:
        return Skip("no place in the graph is after all its inputs and before its readers")
    return None


def _placement(boundary: SiteBoundary) -> fx.Node | None:
    """Where the fused op can go: at the merge if the coefficients' parameters exist by
    then (a rewritten graph's placeholders), else at the coefficients if nothing reads the
    merge before them; None if neither."""
    merge, coeffs = boundary.merge, boundary.coeffs
    position = {node: i for i, node in enumerate(merge.graph.nodes)}
    params = [a for a in coeffs.args[1:4] if isinstance(a, fx.Node)]
    if all(position[a] < position[merge] for a in params):
        return merge
    if all(position[u] > position[coeffs] for u in merge.users if u is not coeffs):
        return coeffs
    return None


def _fuse(graph: fx.Graph, boundary: SiteBoundary, place: fx.Node) -> None:
    """Replace the boundary's nodes by one fused op, inserted before `place`."""
    merge, coeffs, outputs, pre = boundary.merge, boundary.coeffs, boundary.outputs, boundary.pre
    with graph.inserting_before(place):
        fused = graph.call_function(
            _OPS.post_res_coeffs_pre.default, (*merge.args, *coeffs.args[1:])
        )
        parts = [graph.call_function(operator.getitem, (fused, i)) for i in range(5)]
    for index, getitems in outputs.items():
        for getitem in getitems:
            getitem.replace_all_uses_with(parts[1 + index])
    pre.replace_all_uses_with(parts[4])
    graph.erase_node(pre)
    for getitems in outputs.values():
        for getitem in getitems:
            graph.erase_node(getitem)
    graph.erase_node(coeffs)
    merge.replace_all_uses_with(parts[0])
    graph.erase_node(merge)
    for part in parts:
        if not part.users:
            graph.erase_node(part)
