"""Activation-checkpoint regions, closed again after the rewrite.

The site search ran on a graph whose checkpoint bodies were inlined
(`hcpass.frontend.regions`). The rewrite tags every node it creates for a site with the
region of the site's add (`region_of`), so a region's coefficients, branch and merge stay
inside it; `outline_checkpoints` then moves each region's nodes back into a body of their own
and calls it through ``tag_activation_checkpoint`` with the original checkpoint options. The
region's stream inputs and outputs are now n-stream tensors and the mixer parameters it reads
are extra operands, so the mixers are recomputed in the backward like the rest.

Run eagerly (the converted module's own runtime), a region goes through
`torch.utils.checkpoint.checkpoint` itself (`checkpoint_eagerly`); under
``torch.compile(backend="hcpass")`` AOTAutograd lowers the higher-order op.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from hcpass.frontend.regions import CHECKPOINT, REGION, Region, is_checkpoint, region_of


def outline_checkpoints(graph: fx.Graph) -> dict[str, fx.GraphModule]:
    """Move each region's nodes into a body called through ``tag_activation_checkpoint``.

    Returns the bodies by the attribute names the new ``get_attr`` nodes read; the caller
    makes them attributes of the graph's module."""
    members: dict[Region, list[fx.Node]] = {}
    for node in graph.nodes:
        region = region_of(node)
        if region is not None:
            members.setdefault(region, []).append(node)
    bodies: dict[str, fx.GraphModule] = {}
    for region, nodes in members.items():
        name = f"hcpass_checkpoint_body_{region.index}"
        bodies[name] = _outline(graph, region, nodes, name)
    return bodies


def _outline(graph: fx.Graph, region: Region, nodes: list[fx.Node], name: str) -> fx.GraphModule:
    inside = set(nodes)
    inputs = list(dict.fromkeys(p for n in nodes for p in n.all_input_nodes if p not in inside))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]

    body = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for value in inputs:
        env[value] = body.placeholder(value.name)
        env[value].meta = dict(value.meta)
    for node in nodes:
        env[node] = body.node_copy(node, env.__getitem__)
        env[node].meta.pop(REGION, None)
    body.output(tuple(env[n] for n in outputs))

    # The call goes before the first node outside that reads the region; everything the
    # region reads must be computed by then (a region the rewrite made non-convex would
    # need a reader of its output as its input).
    order = {n: i for i, n in enumerate(graph.nodes)}
    readers = [u for n in outputs for u in n.users if u not in inside]
    at = min(readers, key=order.__getitem__) if readers else nodes[-1].next
    late = [v.name for v in inputs if order[v] >= order[at]]
    if late:
        raise RuntimeError(
            f"hcpass: cannot close checkpoint region {region.index}: it reads {late}, which "
            f"are computed after {at.name} reads the region's output"
        )
    with graph.inserting_before(at):
        attr = graph.get_attr(name)
        call = graph.call_function(CHECKPOINT, (attr, *inputs), dict(region.options))
        results = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for node, result in zip(outputs, results, strict=True):
        result.meta = {k: v for k, v in node.meta.items() if k != REGION}
        for user in list(node.users):
            if user not in inside and user is not call:
                user.replace_input_with(node, result)
    for node in reversed(nodes):
        graph.erase_node(node)
    module = fx.GraphModule(torch.nn.Module(), body, class_name="CheckpointBody")
    module.meta.update(region.meta)
    return module


def checkpoint_eagerly(graph: fx.Graph) -> None:
    """Make `graph`'s checkpoint calls run through `torch.utils.checkpoint` when it runs eagerly."""
    for node in graph.nodes:
        if is_checkpoint(node):
            node.target = run_checkpoint


def run_checkpoint(body: fx.GraphModule, *args: Any, **options: Any) -> Any:
    """``tag_activation_checkpoint`` for a graph run eagerly. The op's own eager kernel is
    written to be traced: it turns RNG-state preservation off (Inductor functionalises the
    RNG instead), so dropout in a region would draw new masks when recomputed and the
    gradients would be wrong. This checkpoints with the options the model gave."""
    if not torch.is_grad_enabled():
        # Nothing is saved for a backward, so nothing is recomputed: the body alone gives the
        # same outputs, without torch.utils.checkpoint's per-call cost (at decode time, one
        # position per step, Attention Residuals' regions cost as much as their arithmetic).
        return body(*args)
    context_fn = body.meta.get("_checkpoint_context_fn")
    if context_fn is not None:
        options = {**options, "context_fn": context_fn}
    return torch.utils.checkpoint.checkpoint(body, *args, **options)
