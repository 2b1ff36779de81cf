"""Pass base class and manager."""

from __future__ import annotations

from torch import fx


class GraphPass:
    """A transformation of an FX graph in place."""

    def __call__(self, graph: fx.Graph) -> None:
        raise NotImplementedError


class PassManager(GraphPass):
    """Runs its passes in order, then checks the graph is still well formed."""

    def __init__(self, passes: list[GraphPass]) -> None:
        self.passes = list(passes)

    def __call__(self, graph: fx.Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)
        graph.lint()
