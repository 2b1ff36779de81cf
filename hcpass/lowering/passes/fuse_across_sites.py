"""CUDA lowering: fuse the boundary between consecutive sites of a residual chain.

Where site l's merge ``X' = post_res(x, y, H_post, H_res)`` feeds site l+1 directly,

    X'                 = hcpass.post_res(x, y, H_post, H_res)
    H_pre', H_post', H_res' = hcpass.coeffs(X', phi, alpha, bias, spec)
    u'                 = hcpass.pre(X', H_pre')

becomes one ``hcpass.post_res_coeffs_pre`` whose kernel computes the coefficients from the
merge's registers, so X' is read back once (for u') instead of twice (coeffs, pre). Its
backward is the three ops' backward ops, so training sees the same gradients.

Not fused, and left as they are: a chain's first site (its state comes from ``expand``, not a
merge), a site whose stream passes through a per-stream op first (a post-norm's
flatten / layer_norm / unflatten), and a boundary where no place in the graph comes after
the coefficients' parameters and before every reader of the merge.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
from torch import fx

from hcpass.lowering.passes.manager import GraphPass

log = logging.getLogger(__name__)

_OPS = torch.ops.hcpass


@dataclass
class SiteBoundary:
    """The nodes one fused op replaces."""

    merge: fx.Node  # post_res of site l
    coeffs: fx.Node  # coeffs of site l+1, reading the merge's output
    outputs: dict[int, list[fx.Node]]  # coeffs' getitem nodes by output index
    pre: fx.Node  # pre of site l+1: (merge, H_pre')
    place: fx.Node  # the fused op goes before this node: after its inputs, before any user

    @classmethod
    def match(cls, merge: fx.Node, position: dict[fx.Node, int]) -> SiteBoundary | str:
        """The boundary after `merge`, or why there is none to fuse."""
        reason = "no site reads its output directly" + _through(merge)
        for coeffs in merge.users:
            if not _calls(coeffs, _OPS.coeffs.default) or coeffs.args[0] is not merge:
                continue
            outputs = _getitems(coeffs)
            if outputs is None:
                reason = "the next site's coefficients are used whole, not indexed"
                continue
            place = _placement(merge, coeffs, position)
            if place is None:
                reason = "no place in the graph is after all its inputs and before its readers"
                continue
            for h_pre in outputs.get(0, []):
                for pre in h_pre.users:
                    if _calls(pre, _OPS.pre.default) and pre.args == (merge, h_pre):
                        return cls(merge, coeffs, outputs, pre, place)
            reason = "the next site's branch input is not pre(merge, H_pre)"
        return reason

    def fuse(self, graph: fx.Graph) -> fx.Node:
        """Replace the three ops by one; returns the fused node."""
        with graph.inserting_before(self.place):
            fused = graph.call_function(
                _OPS.post_res_coeffs_pre.default, (*self.merge.args, *self.coeffs.args[1:])
            )
            parts = [graph.call_function(operator.getitem, (fused, i)) for i in range(5)]
        for index, getitems in self.outputs.items():
            for getitem in getitems:
                getitem.replace_all_uses_with(parts[1 + index])
        self.pre.replace_all_uses_with(parts[4])
        graph.erase_node(self.pre)
        for getitems in self.outputs.values():
            for getitem in getitems:
                graph.erase_node(getitem)
        graph.erase_node(self.coeffs)
        self.merge.replace_all_uses_with(parts[0])
        graph.erase_node(self.merge)
        for part in parts:
            if not part.users:
                graph.erase_node(part)
        return fused


class FuseAcrossSites(GraphPass):
    def __call__(self, graph: fx.Graph) -> None:
        merges = [n for n in graph.nodes if _calls(n, _OPS.post_res.default)]
        unfused = []
        for merge in merges:
            position = {node: i for i, node in enumerate(graph.nodes)}
            boundary = SiteBoundary.match(merge, position)
            if isinstance(boundary, SiteBoundary):
                boundary.fuse(graph)
            else:
                unfused.append(f"{merge.name}: {boundary}")
        if merges:
            log.info(
                "hcpass: fused %d of %d site boundaries into post_res_coeffs_pre%s",
                len(merges) - len(unfused),
                len(merges),
                "".join(f"\n  not fused after {line}" for line in unfused),
            )


def _placement(merge: fx.Node, coeffs: fx.Node, position: dict[fx.Node, int]) -> fx.Node | None:
    """Where the fused op can go: at the merge if the coefficients' parameters exist by
    then (a rewritten graph's placeholders), else at the coefficients if nothing reads the
    merge before them; None if neither."""
    params = [a for a in coeffs.args[1:4] if isinstance(a, fx.Node)]
    if all(position[a] < position[merge] for a in params):
        return merge
    if all(position[u] > position[coeffs] for u in merge.users if u is not coeffs):
        return coeffs
    return None


def _through(merge: fx.Node) -> str:
    """', it goes to <op>, ...' naming what reads the merge, for the log."""
    readers = sorted({str(getattr(u.target, "__name__", u.target)) for u in merge.users})
    return f" (it goes to {', '.join(readers)})" if readers else ""


def _calls(node: fx.Node, target: object) -> bool:
    return node.op == "call_function" and node.target is target and not node.kwargs


def _getitems(node: fx.Node) -> dict[int, list[fx.Node]] | None:
    """`node`'s users by output index, or None if any user is not an indexing."""
    outputs: dict[int, list[fx.Node]] = {}
    for user in node.users:
        if not _calls(user, operator.getitem):
            return None
        outputs.setdefault(user.args[1], []).append(user)
    return outputs
