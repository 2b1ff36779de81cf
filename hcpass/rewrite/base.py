"""What both rewrite families share: the slots a site's parameters arrive through, the
result type, inserting nodes, and rewiring a branch to read a new input.

A family (`chains`: hyper-connections, `attnres`: Attention Residuals) takes a graph, its
`SiteAnalysis` and a `MixerSlot` per site, rewrites the graph in place and returns a
`RewriteResult`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from hcpass.frontend.regions import REGION, Region
from hcpass.frontend.sites import Site


@dataclass(frozen=True)
class MixerSlot:
    """What the rewrite needs to know of a site's trainable module (`ConvertedModule.mixers`)."""

    key: str  # placeholder prefix, e.g. "h_0_attn"
    spec: str  # what the module computes (Manifold.spec(), or the Attention Residuals options)
    parameters: tuple[str, ...]  # the module's parameters the graph takes, in order
    streams: int = 1  # hyper-connections: n

    @property
    def dynamic(self) -> bool:
        """A hyper-connection mixer with a projection (``phi``) of the stream state."""
        return "phi" in self.parameters


@dataclass(frozen=True)
class MixerInputs:
    """Placeholders one site module gained, and the parameter placeholder that names it."""

    slot: MixerSlot
    anchor: fx.Node
    channels: int
    placeholders: tuple[fx.Node, ...]  # one per `slot.parameters`


@dataclass(frozen=True)
class RewriteResult:
    mixer_inputs: list[MixerInputs]
    site_count: int
    bodies: dict[str, fx.GraphModule]  # checkpoint bodies the graph's get_attr nodes read
    # Hand-off (hcpass.runtime.handoff): per chain starting at a graph input, that input, the
    # placeholder for its n-stream state (after the mixer placeholders) and the chain's first
    # site; per chain whose last stream value the graph returns, the output's position and
    # the chain's last site (its n-stream state is appended to the outputs, in this order).
    stream_inputs: list[tuple[fx.Node, fx.Node, Site]]
    stream_outputs: list[tuple[int, Site]]


def graph_module(root: fx.GraphModule, graph: fx.Graph, result: RewriteResult) -> fx.GraphModule:
    """The rewritten `graph` as a module: attributes from the captured `root`, checkpoint
    bodies from the rewrite."""
    targets = {n.target for n in graph.nodes if n.op == "get_attr"}
    attrs = {t: result.bodies[t] if t in result.bodies else _attribute(root, t) for t in targets}
    module = fx.GraphModule(attrs, graph, class_name="HcpassGraph")
    module.train(root.training)
    return module


def _attribute(root: torch.nn.Module, target: str) -> object:
    return operator.attrgetter(target)(root)


class Cursor:
    """Inserts nodes one after another, starting after `node`, into checkpoint `region`."""

    def __init__(self, graph: fx.Graph, node: fx.Node, region: Region | None = None) -> None:
        self.graph = graph
        self.last = node
        self.region = region

    def call(self, op: str, target, args: tuple, kwargs: dict | None = None) -> fx.Node:
        with self.graph.inserting_after(self.last):
            self.last = self.graph.create_node(op, target, args, kwargs or {})
        if self.region is not None:
            self.last.meta[REGION] = self.region
        return self.last


def last_placeholder(graph: fx.Graph) -> fx.Node:
    return [n for n in graph.nodes if n.op == "placeholder"][-1]


def add_placeholders(
    graph: fx.Graph, sites: list[Site], slot_of: dict[Site, MixerSlot]
) -> dict[str, MixerInputs]:
    """One placeholder per parameter of each site module, after the graph's inputs (a
    placeholder must precede every other node). A graph without sites may have no inputs
    at all (Dynamo's graph of a constant between two graph breaks)."""
    if not sites:
        return {}
    cursor = Cursor(graph, last_placeholder(graph))
    inputs: dict[str, MixerInputs] = {}
    for site in sites:
        slot = slot_of[site]
        if slot.key not in inputs:
            prefix = slot.key if slot.key.isidentifier() else f"mixer_{slot.key}"
            nodes = tuple(cursor.call("placeholder", f"{prefix}_{n}", ()) for n in slot.parameters)
            inputs[slot.key] = MixerInputs(slot, site.anchor, site.channels, nodes)
    return inputs


class BranchRewirer:
    """Makes a site's branch read a new input instead of its stream value.

    Branch nodes shared by two sites (the norm of a parallel block) are copied for the
    second site, from the inputs the node had before the first site rewired it, so each
    site's branch reads its own input. A shared node that reads nothing the second site
    rewires -- the branch of a site nested inside the second site's branch -- is not
    copied: the second site's branch computes through the nested chain as rewritten."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.claimed: dict[fx.Node, tuple[tuple, dict]] = {}
        self.order = {node: i for i, node in enumerate(graph.nodes)}

    def rewire(self, site: Site, new_input: fx.Node) -> dict[fx.Node, fx.Node]:
        """Rewire `site`'s branch to read `new_input`; returns each branch node's
        replacement (the node itself where it was rewired in place, else its copy)."""
        env = {site.read: new_input}
        for node in sorted(site.branch_nodes, key=self.order.__getitem__):
            if node in self.claimed:
                args, kwargs = self.claimed[node]
                inputs: list[fx.Node] = []
                fx.map_arg((args, kwargs), inputs.append)
                if all(env.get(a, a) is a for a in inputs):
                    env[node] = node
                    continue
                with self.graph.inserting_before(node):
                    env[node] = self.graph.create_node(
                        node.op,
                        node.target,
                        fx.map_arg(args, lambda a: env.get(a, a)),
                        fx.map_arg(kwargs, lambda a: env.get(a, a)),
                        name=node.name,
                    )
                env[node].meta = dict(node.meta)
            else:
                self.claimed[node] = (node.args, node.kwargs)
                for old in [p for p in node.all_input_nodes if env.get(p, p) is not p]:
                    node.replace_input_with(old, env[old])
                env[node] = node
        return env


def rank(node: fx.Node) -> int:
    return node.meta["example_value"].dim()


def dtype(node: fx.Node) -> torch.dtype:
    return node.meta["example_value"].dtype
