"""The per-graph rewrite driver of a converted module.

Every graph Dynamo captures of a converted forward -- with the example inputs at
conversion, and again at each re-capture (new shapes, a graph break, an outer compile) -- is
analysed by the front end (`hcpass.frontend.plan.analyse`), keeping the sites the plan gave
a mixer, and rewritten by the module's family (`hcpass.runtime.families`) with the mixers
the lookup finds. The result
is a `MixedGraph`, which the runtime runs eagerly (`eager_backend`) or the lowering backend
compiles (through `hcpass.runtime.call.Rewriter`, which `GraphRewriter` implements).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import fx, nn

from hcpass import logs
from hcpass.frontend.capture import annotate_call, annotate_parameters, parameter_names
from hcpass.frontend.plan import analyse
from hcpass.frontend.sites import Site
from hcpass.rewrite.base import graph_module
from hcpass.rewrite.regions import checkpoint_eagerly
from hcpass.runtime import handoff
from hcpass.runtime.call import MixedGraph, current_rewriter
from hcpass.runtime.decode import call_decode_steps
from hcpass.runtime.families import Family
from hcpass.runtime.lookup import SiteLookup
from hcpass.runtime.mixer import SiteModule

NOT_PLANNED = "no mixer: the site was not rewritten when the model was converted"


class GraphRewriter:
    """Rewrites the graphs captured from one converted module's forward."""

    def __init__(
        self,
        model: nn.Module,
        lookup: SiteLookup,
        mixers: dict[str, SiteModule],
        family: Family[Any],
        options: Any,
    ) -> None:
        self._model = model
        self._lookup = lookup
        self._family = family
        self._options = options  # the family's
        # Equal for modules whose rewritten graphs are interchangeable: the same sites with
        # the same mixers (the family and options are in each mixer's spec).
        self.rewrite_key: Hashable = tuple(
            (key, m.spec, m.channels, m.graph_parameters) for key, m in sorted(mixers.items())
        )

    def rewrite(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, MixedGraph]:
        """Rewrite a graph Dynamo captured from the module's forward.

        Returns the rewritten GraphModule and a callable running `fn(*inputs, *mixer
        params)`; the caller sets `MixedGraph.fn` (eager: the GraphModule itself)."""
        annotate_parameters(gm, parameter_names(self._model))
        graph, analysis = analyse(gm, keep=self._keep, narrow=self._family.narrow)
        slots = {site: self._lookup.slot(site.anchor_name) for site in analysis.sites}
        result = self._family.rewrite(graph, analysis, slots, self._options)
        rewritten = graph_module(gm, graph, result)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        index_of = {node.name: i for i, node in enumerate(placeholders)}
        anchors = tuple((index_of[m.anchor.name], m) for m in result.mixer_inputs)
        notes = tuple(
            f"{skipped.node.name}: {skipped.reason}"
            for skipped in analysis.skipped
            if skipped.reason != NOT_PLANNED
        )
        starts = tuple(
            index_of[chain.sites[0].anchor.name]
            for chain in analysis.chains
            if chain.input.op != "placeholder"
        )
        stream_inputs = tuple(
            handoff.StreamInput(index_of[x.name], index_of[site.anchor.name], slots[site].streams)
            for x, _, site in result.stream_inputs
        )
        stream_outputs = tuple(
            handoff.StreamOutput(position, index_of[site.anchor.name])
            for position, site in result.stream_outputs
        )
        mixed = MixedGraph(
            rewritten,
            anchors,
            result.site_count,
            gm,
            self.rewrite_key,
            notes=notes,
            starts=starts,
            stream_inputs=stream_inputs,
            stream_outputs=stream_outputs,
        )
        return rewritten, mixed

    def rewrite_eagerly(
        self,
        gm: fx.GraphModule,
        where: str = "hcpass eager runtime",
        args: Sequence[Any] | None = None,
    ) -> MixedGraph:
        """`rewrite`, for the graph to run eagerly (checkpoint regions too; the mixer ops
        through `hcpass.runtime.decode`, natively at a few positions without gradients).
        With `args`, the graph's parameter placeholders are first named from the tensors it
        is called with (a graph captured for another module)."""
        if args is not None:
            annotate_call(gm, args, parameter_names(self._model))
        rewritten, mixed = self.rewrite(gm)
        checkpoint_eagerly(rewritten.graph)
        call_decode_steps(rewritten)
        rewritten.recompile()
        logs.rewritten_graph(rewritten, mixed.mixer_names, mixed.site_count, where)
        return mixed

    def mixer_parameters(self, mixed: MixedGraph, args: Sequence[Any]) -> list[torch.Tensor]:
        """The mixer parameters `mixed` takes after `args`, its own inputs."""
        return [
            p
            for index, inputs in mixed.mixer_inputs
            for p in self._lookup.mixer_parameters(args[index], inputs)[1]
        ]

    def _keep(self, site: Site) -> str | None:
        return None if self._lookup.planned(site.anchor_name) else NOT_PLANNED


def eager_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """The converted module's own runtime: rewrite, then run the rewritten graph eagerly.

    One module-level function, so Dynamo's per-backend cache entries don't multiply."""
    rewriter = current_rewriter()
    if rewriter is None:
        raise RuntimeError("hcpass: the runtime backend ran outside a converted forward")
    return rewriter.rewrite_eagerly(gm)
