"""Activation-checkpoint regions, opened for the site search.

Dynamo records ``torch.utils.checkpoint.checkpoint(block, x)`` -- reentrant or not, and HF's
``gradient_checkpointing_enable()`` -- as one ``tag_activation_checkpoint(body, x, *params)``
node whose body is a GraphModule attribute. A residual chain runs through many such regions
(one per block), so sites cannot be rewritten region by region: the n streams must cross the
region boundaries. `inline_checkpoints` copies each body into the parent graph, tagging the
copies with their `Region`; the site search then sees one flat graph. The rewrite closes the
regions again (`hcpass.rewrite.regions`).

A body that itself contains a checkpoint (nested regions) or reads graph attributes stays
closed: its adds are not searched, and `explain` lists the region as skipped with that
reason (docs/limitations.md).
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from hcpass.frontend.sites import Skipped

CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint
REGION = "hcpass_region"  # node.meta key: the Region a node belongs to


@dataclass(frozen=True, eq=False)
class Region:
    """One checkpointed call: its options (``use_reentrant``, ...) as Dynamo recorded them."""

    index: int
    options: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # the body's (a selective policy)


def is_checkpoint(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is CHECKPOINT


def region_of(node: fx.Node) -> Region | None:
    return node.meta.get(REGION)


def inline_checkpoints(graph: fx.Graph, root: fx.GraphModule) -> list[Skipped]:
    """Replace each checkpoint call of `graph` by a copy of its body (`root` owns the bodies).
    Returns the calls left closed, with the reason."""
    count = itertools.count()
    closed: list[Skipped] = []
    for call in [n for n in graph.nodes if is_checkpoint(n)]:
        attr, *operands = call.args
        body = operator.attrgetter(attr.target)(root)
        if any(is_checkpoint(n) or n.op == "get_attr" for n in body.graph.nodes):
            reason = (
                "activation-checkpoint region not searched: it contains another checkpoint "
                "region or reads graph attributes, so residual adds inside stay unrewritten"
            )
            closed.append(Skipped(call, reason))
            continue
        region = Region(next(count), dict(call.kwargs), dict(body.meta))
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        env: dict[fx.Node, Any] = dict(zip(placeholders, operands, strict=True))
        outputs: tuple = ()
        with graph.inserting_before(call):
            for node in body.graph.nodes:
                if node.op == "output":
                    outputs = fx.map_arg(node.args[0], env.__getitem__)
                elif node.op != "placeholder":
                    env[node] = graph.node_copy(node, env.__getitem__)
                    env[node].meta[REGION] = region
        for user in list(call.users):
            if user.target is not operator.getitem:
                raise RuntimeError(f"hcpass: unexpected reader {user.format_node()} of {call}")
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(call)
        if not attr.users:
            graph.erase_node(attr)
    return closed
