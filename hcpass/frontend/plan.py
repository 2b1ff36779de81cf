"""Decide which sites get mixers, name them, and report on every candidate add.

Shared by `convert`/`explain` (on the graphs captured with the example inputs) and by the
runtime and backend (on every re-capture), so a site is recognised the same way each time.

The rewrite family (`hcpass.runtime.families`) is a later stage: what the front end needs of
it, the family's own narrowing of the sites (`Narrow`), is handed in by the caller.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from torch import fx, nn

from hcpass.frontend.capture import CapturedGraph, parameter_name
from hcpass.frontend.regions import inline_checkpoints
from hcpass.frontend.sites import (
    Chain,
    SiteAnalysis,
    SiteFilter,
    find_sites,
    normalize_inplace,
)
from hcpass.patterns.node_sets import is_affine_stream_op
from hcpass.text import table, unique_name

# A rewrite family's narrowing of the sites: moves the chains the family cannot rewrite to
# `SiteAnalysis.skipped`, each site with the reason (Attention Residuals: `keep_convertible`).
Narrow = Callable[[SiteAnalysis], None]

REWRITTEN = "rewritten"
SKIPPED = "skipped"
WHAT_IS_A_SITE = (
    "a residual site is an add `x + f(x)` (also `x += f(x)`, `torch.add(x, f(x), alpha=a)`) of "
    "two tensors of the same shape (floating dtypes may differ), where the branch f reads the "
    "stream x through at least one parameterised op"
)

NO_GRAPH = (
    "Dynamo captured no graph of the forward: it ran the forward eagerly, so hcpass saw none "
    "of its adds. Usual causes: a graph break inside a loop over the blocks (print, an "
    "nn.GRU/LSTM/RNN, data-dependent Python control flow, nn.TransformerEncoder called with a "
    "float mask and no is_causal), a frame Dynamo skips, or its recompile limit. "
    "`torch._dynamo.explain(model)(*inputs)` lists the graph breaks"
)


@dataclass(frozen=True)
class SiteReport:
    name: str  # mixer name (module path) for sites, node name otherwise
    status: str  # "rewritten" or "skipped"
    reason: str
    graph: int  # which captured graph (> 0 after graph breaks)
    node: str  # the add's node name in that graph


@dataclass(frozen=True)
class Report:
    """What `explain`/`convert` found: one row per same-shape tensor add."""

    rows: list[SiteReport]  # every candidate add, the skipped ones too
    graphs: int
    graph_breaks: list[str]

    @property
    def sites(self) -> list[SiteReport]:
        # The rows include skipped adds, which are not sites: fail at once with the new name.
        raise AttributeError(
            "Report.sites was renamed to Report.rows (one row per same-shape add, skipped "
            "ones too); use report.rows, or report.rewritten for the sites"
        )

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.rows if s.status == REWRITTEN]

    @property
    def skipped(self) -> list[SiteReport]:
        return [s for s in self.rows if s.status == SKIPPED]

    def to_dict(self) -> dict:
        # The JSON keeps its "sites" key: files and `hcpass explain --json` readers use it.
        return {
            "graphs": self.graphs,
            "graph_breaks": self.graph_breaks,
            "sites": [vars(s) for s in self.rows],
        }

    def __setstate__(self, state: dict) -> None:
        # A module saved before the rename (`torch.save(converted)`) holds the rows as "sites".
        if "sites" in state:
            state = {**state, "rows": state["sites"]}
            del state["sites"]
        self.__dict__.update(state)

    def __str__(self) -> str:
        rows = [(s.name, s.status, s.reason or "-") for s in self.rows]
        totals = (
            f"{len(self.rewritten)} rewritten, {len(self.skipped)} skipped, "
            f"{self.graphs} graph(s), {len(self.graph_breaks)} graph break(s)"
        )
        text = table(rows, header=("site", "status", "reason")) + "\n" + totals
        return text + (f"\n{NO_GRAPH}." if self.graphs == 0 else "")


def analyse(
    gm: fx.GraphModule, keep: SiteFilter | None = None, narrow: Narrow | None = None
) -> tuple[fx.Graph, SiteAnalysis]:
    """A normalised copy of `gm`'s graph and the sites a family can rewrite (the copy is
    what a rewrite edits): those `keep` keeps, then those the family's `narrow` leaves (None:
    every chain), with activation-checkpoint bodies inlined (`regions`) so their adds are
    searched. Parameter placeholders must carry their names (`capture.annotate_parameters`)."""
    graph = copy.deepcopy(gm.graph)
    closed = inline_checkpoints(graph, gm)
    normalize_inplace(graph)
    analysis = find_sites(graph, parameter_name, keep)
    if narrow is not None:
        narrow(analysis)
    analysis.skipped.extend(closed)
    return graph, analysis


def site_names(model: nn.Module, anchors: Sequence[str]) -> dict[str, str]:
    """Each anchor's site name (`site_name`), told apart where two sites would share one:
    by the layer that holds each anchor when those differ (``inner.a``, ``inner.b`` for two
    residuals in one module), else by a call count (``blk``, ``blk#2``: the second call of
    a weight-shared block, which has a mixer of its own)."""
    names = {anchor: site_name(model, anchor) for anchor in dict.fromkeys(anchors)}
    groups: dict[str, list[str]] = {}
    for anchor, name in names.items():
        groups.setdefault(name, []).append(anchor)
    taken: set[str] = set()
    for name, group in groups.items():
        owners = [anchor.rpartition(".")[0] for anchor in group]
        if len(group) > 1 and len(set(owners)) == len(group):
            names.update(zip(group, owners, strict=True))
            continue
        for anchor in group:
            names[anchor] = unique_name(name, taken, separator="#")
            taken.add(names[anchor])
    return names


def site_name(model: nn.Module, anchor: str) -> str:
    """The module a site belongs to: the owner of the branch's last parameter, or that
    owner's parent when the owner is a leaf (``h.0.attn.c_proj.weight`` -> ``h.0.attn``)
    and the parent is not a list of layers (``attn.0.weight`` stays ``attn.0``). A
    parameter of a list or dict of parameters (per-layer gates, ``gates.0``) or of the root
    module names the site itself: their owner is shared by every layer."""
    owner = anchor.rpartition(".")[0]
    if not owner or isinstance(model.get_submodule(owner), (nn.ParameterList, nn.ParameterDict)):
        return anchor
    if not any(True for _ in model.get_submodule(owner).children()):
        parent = owner.rpartition(".")[0]
        container = parent and isinstance(
            model.get_submodule(parent), (nn.ModuleList, nn.ModuleDict)
        )
        if parent and not container:
            owner = parent
    return owner


def mixer_key(name: str) -> str:
    """ModuleDict key for a site: dots become underscores (``h.0.attn`` -> ``h_0_attn``)."""
    return re.sub(r"\W", "_", name)


@dataclass(frozen=True)
class PlannedSite:
    key: str  # ModuleDict key of the mixer
    name: str
    anchor: str  # full name of the parameter the mixer is keyed on
    channels: int
    chain_position: int  # index of the site in its chain (the init favours stream k mod n)
    follows: str | None  # key of the site before it in its chain, across graph breaks
    # Its chain applies a nonlinear op (post-norm, activation) to every stream, here or after
    # a graph break: the init must keep the streams copies (`Manifold.init_bias`).
    keep_copies: bool = False
    # The last site of its chain (Attention Residuals: its module holds the output query).
    ends_chain: bool = False


@dataclass(frozen=True)
class Plan:
    report: Report
    planned: list[PlannedSite]  # one per distinct mixer
    runs: int  # site executions per forward (a weight-shared block counts each call)


@dataclass(frozen=True)
class _ChainEnd:
    """A chain whose last stream value a graph returns: a later graph may continue it."""

    key: str  # the last site's mixer key
    name: str
    length: int  # sites in the chain so far, across graphs


def plan(model: nn.Module, graphs: Sequence[CapturedGraph], narrow: Narrow | None = None) -> Plan:
    """The sites of `graphs` that get a mixer (those `narrow` leaves, as `analyse`), named
    and chained across graph breaks, and a report row for every candidate add."""
    rows: list[SiteReport] = []
    planned: dict[str, PlannedSite] = {}
    keys: set[str] = set()
    runs = 0
    ends: dict[tuple[int, int], _ChainEnd] = {}  # (graph, output position) -> chain end
    copies: set[str] = set()  # keys of sites whose chain part lifts a nonlinear op
    chain_ends: set[str] = set()
    analysed = [(captured, *analyse(captured.gm, narrow=narrow)) for captured in graphs]
    names = site_names(
        model,
        [
            site.anchor_name
            for _, _, analysis in analysed
            for c in analysis.chains
            for site in c.sites
        ],
    )
    for captured, graph, analysis in analysed:
        graph_rows: list[tuple[fx.Node, SiteReport]] = []
        for chain in analysis.chains:
            before = _continued(graph, chain, captured, ends)
            follows = before.key if before else None
            for i, site in enumerate(chain.sites):
                name = names[site.anchor_name]
                if site.anchor_name not in planned:
                    key = unique_name(mixer_key(name), keys)
                    keys.add(key)
                    chain_position = i + (before.length if before else 0)
                    planned[site.anchor_name] = PlannedSite(
                        key, name, site.anchor_name, site.channels, chain_position, follows
                    )
                follows = planned[site.anchor_name].key
                runs += 1
                reason = ""
                if i == 0 and before is not None:
                    reason = (
                        f"continues the chain of {before.name} across a graph break "
                        "(its n streams are handed over)"
                    )
                row = SiteReport(name, REWRITTEN, reason, captured.index, site.node.name)
                graph_rows.append((site.node, row))
            if not all(is_affine_stream_op(op) for op in chain.stream_ops):
                copies.update(planned[s.anchor_name].key for s in chain.sites)
            chain_ends.add(planned[chain.sites[-1].anchor_name].key)
            total = len(chain.sites) + (before.length if before else 0)
            end = _ChainEnd(follows, planned[chain.sites[-1].anchor_name].name, total)
            for position in _returned_at(graph, chain.stream_values[-1]):
                ends[(captured.index, position)] = end
        for skipped in analysis.skipped:
            label = _node_label(skipped.node)
            row = SiteReport(label, SKIPPED, skipped.reason, captured.index, skipped.node.name)
            graph_rows.append((skipped.node, row))
        position_of = {node: i for i, node in enumerate(graph.nodes)}
        rows += [row for _, row in sorted(graph_rows, key=lambda item: position_of[item[0]])]
    breaks = [g.graph_break for g in graphs if g.graph_break]
    # The sites before a nonlinear op, in earlier graphs too, must keep the streams copies.
    follows = {p.key: p.follows for p in planned.values()}
    for key in list(copies):
        while (key := follows[key]) is not None and key not in copies:
            copies.add(key)
    planned_sites = [
        replace(p, keep_copies=p.key in copies, ends_chain=p.key in chain_ends)
        for p in planned.values()
    ]
    return Plan(Report(rows, len(graphs), breaks), planned_sites, runs)


def _node_label(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return f"{_clean_path(path)}:{node.name}"
    return node.name


def _clean_path(path: str) -> str:
    """``L['self'].h.0.attn`` / ``L['self']._modules['h']._modules['0']`` -> ``h.0.attn``."""
    path = path.replace("L['self']", "").replace("._modules['", ".").replace("['", ".")
    return path.replace("']", "").strip(".") or "root"


def _continued(
    graph: fx.Graph, chain: Chain, captured: CapturedGraph, ends: dict[tuple[int, int], _ChainEnd]
) -> _ChainEnd | None:
    """The earlier graph's chain this chain continues: its input is a graph input that was
    the last stream value of that chain (hcpass.runtime.handoff carries the n streams across)."""
    if chain.input.op != "placeholder":
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    source = captured.inputs_from.get(placeholders.index(chain.input))
    return ends.get(source) if source is not None else None


def _returned_at(graph: fx.Graph, value: fx.Node) -> list[int]:
    """The output positions at which `graph` returns `value`."""
    values = graph.output_node().args[0]
    return [i for i, v in enumerate(values) if v is value]
