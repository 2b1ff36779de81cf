"""What a pre-Inductor pass is, and where passes count what they did."""

from __future__ import annotations

from torch import fx
from torch._dynamo.utils import counters


class GraphPass:
    """A transformation of an FX graph in place."""

    def __call__(self, graph: fx.Graph) -> None:
        raise NotImplementedError


def count(event: str, times: int = 1) -> None:
    """Add `times` to ``torch._dynamo.utils.counters["hcpass"][event]`` (cleared by
    ``counters.clear()``, as Dynamo's own are)."""
    if times:
        counters["hcpass"][event] += times
