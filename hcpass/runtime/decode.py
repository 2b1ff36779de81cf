"""The eager runtime's graphs call the mixer ops through `hcpass.ops.decode`: at a few
positions (a decoding step) without gradients, a site's mixer work is one native call.

A rewritten graph runs, per hyper-connection site, ``coeffs`` and ``pre`` on the state the
site reads, and ``post_res`` where the branch returns; the state a site reads is most often
the merge of the site before it. `call_decode_steps` replaces

- ``post_res`` whose result a ``coeffs`` and its ``pre`` read with one `decode.merge_read`,
- any other ``coeffs`` with its ``pre`` with one `decode.site_read`,
- any other ``post_res`` with `decode.merge`, and ``attnres`` with `decode.attnres`,

in the graph and in its checkpoint bodies. Each of these runs the ops themselves, in the
same order, wherever the native path does not apply (gradients, a dispatch mode, autocast,
many positions): what the graph computes and what an observer of the ops sees are
unchanged. Only the eager runtime's graphs are rewritten this way: compiled and exported
graphs keep the ops (Inductor and torch.export lower them).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from hcpass.ops import decode

_COEFFS = torch.ops.hcpass.coeffs.default
_PRE = torch.ops.hcpass.pre.default
_POST_RES = torch.ops.hcpass.post_res.default
_ATTNRES = torch.ops.hcpass.attnres.default


def call_decode_steps(gm: fx.GraphModule) -> None:
    """Rewrite `gm` and its checkpoint bodies as the module docstring says (the bodies are
    recompiled here, `gm` by the caller)."""
    changed = False
    for module in gm.modules():
        if isinstance(module, fx.GraphModule) and _rewrite(module.graph):
            changed = True
            if module is not gm:
                module.recompile()
    if changed:
        decode.prefetch()


def _call(node: fx.Node) -> bool:
    return node.op == "call_function"


def _rewrite(graph: fx.Graph) -> bool:
    changed = False
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if _call(node) and node.target is _COEFFS:
            changed |= _fuse_read(graph, node, order)
    for node in graph.nodes:
        if _call(node) and node.target is _POST_RES:
            node.target, changed = decode.merge, True
        elif _call(node) and node.target is _ATTNRES:
            node.target, changed = decode.attnres, True
    if changed:
        graph.lint()
    return changed


def _fuse_read(graph: fx.Graph, coeffs: fx.Node, order: dict[fx.Node, int]) -> bool:
    """``coeffs`` and the ``pre`` that reads its H_pre as one call, with the ``post_res``
    that computed their state where there is one."""
    x, *params = coeffs.args
    outputs = {}
    for user in coeffs.users:
        if not (_call(user) and user.target is operator.getitem):
            return False
        outputs[user.args[1]] = user
    readers = [
        user
        for user in (outputs[0].users if 0 in outputs else ())
        if _call(user) and user.target is _PRE and user.args == (x, outputs[0])
    ]
    if not readers:
        return False
    pre = readers[0]
    merge = x if isinstance(x, fx.Node) and _call(x) and x.target is _POST_RES else None
    inputs = [p for p in params if isinstance(p, fx.Node)]
    if merge is not None and all(order.get(p, len(order)) < order[merge] for p in inputs):
        with graph.inserting_before(merge):
            fused = graph.call_function(decode.merge_read, (*merge.args, *params))
            state = graph.call_function(operator.getitem, (fused, 0))
        merge.replace_all_uses_with(state)
        first = 1
    else:
        merge = None
        with graph.inserting_before(coeffs):
            fused = graph.call_function(decode.site_read, (x, *params))
        first = 0
    with graph.inserting_after(fused):
        for index, getitem in outputs.items():
            getitem.replace_all_uses_with(
                graph.call_function(operator.getitem, (fused, first + index))
            )
        pre.replace_all_uses_with(graph.call_function(operator.getitem, (fused, first + 3)))
    for dead in (pre, *outputs.values(), coeffs, *([merge] if merge is not None else [])):
        graph.erase_node(dead)
    return True
