"""Pass base class and manager."""

from __future__ import annotations

import hashlib
import inspect

from torch import fx


class GraphPass:
    """A transformation of an FX graph in place."""

    def __call__(self, graph: fx.Graph) -> None:
        raise NotImplementedError

    def uuid(self) -> str:
        """Changes whenever the pass's code changes (Inductor's cache key includes it)."""
        source = inspect.getsource(type(self))
        return hashlib.sha256(source.encode()).hexdigest()


class PassManager(GraphPass):
    def __init__(self, passes: list[GraphPass] | None = None) -> None:
        self.passes: list[GraphPass] = list(passes or [])

    def register(self, graph_pass: GraphPass) -> GraphPass:
        self.passes.append(graph_pass)
        return graph_pass

    def __call__(self, graph: fx.Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)
        graph.lint()

    def uuid(self) -> str:
        joined = "".join(p.uuid() for p in self.passes)
        return hashlib.sha256(joined.encode()).hexdigest()
