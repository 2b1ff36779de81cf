"""Rewrite each residual chain of a graph into Attention Residuals (Kimi Team, 2026).

Input: a graph (normalised by `sites.normalize_inplace`), its `SiteAnalysis` with only the
chains `hcpass.frontend.attnres` accepts, and a `MixerSlot` per site (its pseudo-query; the
chain's last site also takes the output query). Output: the graph rewritten in place
(`RewriteResult`, no hand-off: these chains never cross a graph break).

Per chain ``x_0 -> x_l = x_{l-1} + y_l`` (docs/math.md), with block size S (1: full
Attention Residuals):
- the values are the completed blocks ``b_0 = x_0, b_1, ...`` and the partial block P, the
  sum of the branch outputs of the current block (a site that starts a block closes P);
- site l's branch reads ``hcpass.attnres([b_0, ..., P], w_l, eps)`` instead of x_{l-1};
- the readers of the chain's last value (its final norms) read the same with the output
  query;
- each of those norms' epsilon is divided by k^2 for k values, so at init (uniform weights,
  a mean of the values: ``x / k``) every norm computes what it did;
- anything else that reads a stream value (a list of hidden states) reads the plain sum
  ``x_l``, which the original adds still compute (from the new branch outputs); adds that
  nothing reads any more are removed.

Memory: each depth attention and the norm that reads it form an activation-checkpoint
region of their own (unless the site is in a checkpointed block already), so the backward
recomputes ``h`` instead of keeping it: what stays is the op's inputs -- the blocks, which
all sites share, and the partial block, where the plain model keeps its stream value for
the norm. Block AttnRes thus keeps O(N) values per position more than the plain model
(docs/performance.md has the measurement).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

import hcpass.ops  # noqa: F401  (registers torch.ops.hcpass)
from hcpass.frontend.attnres import ChainNorms, chain_norms
from hcpass.frontend.regions import REGION, Region, region_of
from hcpass.frontend.sites import Chain, Site, SiteAnalysis
from hcpass.patterns.result import Skip
from hcpass.patterns.scale_invariant_norm import ScaleInvariantNorm
from hcpass.rewrite.base import (
    BranchRewirer,
    Cursor,
    MixerInputs,
    MixerSlot,
    RewriteResult,
    add_placeholders,
    dtype,
)
from hcpass.rewrite.regions import outline_checkpoints

# The epsilon of the keys' RMSNorm inside the depth attention.
KEY_EPS = 1e-6


@dataclass(frozen=True)
class AttnResOptions:
    """``block_size``: sites per block (None: full Attention Residuals, every site's output
    is a value of its own). Sites count per sublayer, as in the paper: a transformer layer
    with attention and MLP is two."""

    block_size: int | None = None
    eps: float = KEY_EPS

    def __post_init__(self) -> None:
        size = self.block_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"block_size must be a positive int or None (full), got {size!r}")
        if not (isinstance(self.eps, float) and self.eps > 0):
            raise ValueError(f"eps must be a float > 0, got {self.eps!r}")

    def spec(self) -> str:
        block = "full" if self.block_size is None else f"block={self.block_size}"
        return f"attnres({block}, eps={self.eps:g})"


@dataclass(frozen=True)
class _Depth:
    """The values of a chain at one of its stream values."""

    blocks: tuple[fx.Node, ...]
    partial: fx.Node | None  # the current block's sum; None before the first site
    last: fx.Node  # the last node made for this state (new nodes go after it)

    @property
    def values(self) -> list[fx.Node]:
        return [*self.blocks, *([self.partial] if self.partial is not None else [])]


def rewrite_attnres(
    graph: fx.Graph,
    analysis: SiteAnalysis,
    slot_of: dict[Site, MixerSlot],
    options: AttnResOptions,
) -> RewriteResult:
    """Rewrite `graph` in place (see the module docstring)."""
    inputs = add_placeholders(graph, analysis.sites, slot_of)
    branches = BranchRewirer(graph)
    regions = _Regions(graph)
    for chain in analysis.chains:
        norms = chain_norms(chain)
        if isinstance(norms, Skip):  # the front end filters these out
            raise ValueError(f"cannot rewrite this chain to Attention Residuals: {norms.reason}")
        _Chain(graph, chain, norms.value, inputs, slot_of, branches, regions, options).run()
    bodies = outline_checkpoints(graph)
    graph.lint()
    return RewriteResult(list(inputs.values()), len(analysis.sites), bodies, [], [])


class _Chain:
    def __init__(
        self,
        graph: fx.Graph,
        chain: Chain,
        norms: ChainNorms,
        inputs: dict[str, MixerInputs],
        slot_of: dict[Site, MixerSlot],
        branches: BranchRewirer,
        regions: _Regions,
        options: AttnResOptions,
    ) -> None:
        self.graph = graph
        self.regions = regions
        self.chain = chain
        self.norms = norms
        self.inputs = inputs
        self.slot_of = slot_of
        self.branches = branches
        self.block_size = options.block_size or 1
        self.eps = options.eps
        self.dtype = dtype(chain.sites[0].node)
        self.branch_out: dict[Site, fx.Node] = {}

    def run(self) -> None:
        chain = self.chain
        first = chain.input
        cursor = Cursor(self.graph, first, region_of(first))
        if dtype(first) != self.dtype:
            first = cursor.call("call_method", "to", (first, self.dtype))
        depth = {chain.input: _Depth((first,), None, cursor.last)}
        for index, site in enumerate(chain.sites):
            self._branch(site, depth[site.read])
            depth[site.node] = self._merge(site, index, depth[site.stream])
        last_site = chain.sites[-1]
        end = depth[last_site.node]
        query = self._parameter(last_site, "output_query")
        readers = [node for norm in self.norms.output for node in norm.nodes]
        region = region_of(readers[0])
        h = self._attend(Cursor(self.graph, end.last, region), end, query)
        for norm in self.norms.output:
            for node in norm.nodes:
                node.replace_input_with(norm.input, h)
            _divide_eps(norm.eps.node, norm, len(end.values))
        if region is None:
            self.regions.recompute([h, *(n for norm in self.norms.output for n in norm.body)])
        for value in reversed(chain.stream_values):
            if value is not chain.input and not value.users:
                self.graph.erase_node(value)

    def _parameter(self, site: Site, name: str) -> fx.Node:
        inputs = self.inputs[self.slot_of[site].key]
        return inputs.placeholders[inputs.slot.parameters.index(name)]

    def _attend(self, cursor: Cursor, state: _Depth, query: fx.Node) -> fx.Node:
        values = state.values
        op = torch.ops.hcpass.attnres.default
        return cursor.call("call_function", op, (values, query, self.eps))

    def _branch(self, site: Site, state: _Depth) -> None:
        """The branch reads the depth attention over the values at its stream value."""
        if len(state.values) == 1:  # the chain's first site reads x_0, whatever its weights
            h = state.values[0]
        else:
            cursor = Cursor(self.graph, state.last, region_of(site.node))
            h = self._attend(cursor, state, self._parameter(site, "query"))
        env = self.branches.rewire(site, h)
        for norm in self.norms.branch[site]:
            _divide_eps(env[norm.eps.node], norm, len(state.values))
        if len(state.values) > 1 and region_of(site.node) is None:
            norms = self.norms.branch[site]
            self.regions.recompute([h, *(env[n] for norm in norms for n in norm.body)])
        self.branch_out[site] = env[site.branch]
        if env[site.branch] is not site.branch:  # a copy: the plain sum adds the copy's output
            site.node.replace_input_with(site.branch, env[site.branch])

    def _merge(self, site: Site, index: int, state: _Depth) -> _Depth:
        """The values after the site: its branch output starts a block or joins the partial."""
        cursor = Cursor(self.graph, site.node, region_of(site.node))
        y = self.branch_out[site]
        if dtype(y) != self.dtype:
            y = cursor.call("call_method", "to", (y, self.dtype))
        if site.alpha != 1.0:
            y = cursor.call("call_function", operator.mul, (y, site.alpha))
        if index % self.block_size == 0:
            return _Depth(tuple(state.values), y, cursor.last)
        partial = cursor.call("call_function", operator.add, (state.partial, y))
        return _Depth(state.blocks, partial, cursor.last)


class _Regions:
    """New activation-checkpoint regions, numbered after the graph's own (the front end's
    inlined checkpoints): a region's nodes are recomputed in the backward."""

    def __init__(self, graph: fx.Graph) -> None:
        taken = [r.index for n in graph.nodes if (r := region_of(n)) is not None]
        self.next = max(taken, default=-1) + 1

    def recompute(self, nodes: list[fx.Node]) -> None:
        region = Region(self.next, {"use_reentrant": False})
        self.next += 1
        for node in nodes:
            node.meta[REGION] = region


def _divide_eps(node: fx.Node, norm: ScaleInvariantNorm, values: int) -> None:
    """Set the epsilon of `norm` (written in `node`, the norm's node or its copy) to
    ``eps / values^2``: its input is the mean of `values` values at init."""
    eps = norm.eps.value / values**2
    if isinstance(norm.eps.index, int):
        args = list(node.args)
        args[norm.eps.index] = eps
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, norm.eps.index: eps}
