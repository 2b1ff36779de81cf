"""The spellings of a tensor + tensor add in a Dynamo graph.

Every spelling is ``add(lhs, rhs)`` with at most an ``alpha=`` keyword, so the spellings are
data: which targets are adds (`ADDS`) and which of them write into ``lhs`` (`INPLACE_ADDS`).
As in `hcpass.patterns.node_sets`, a string is a tensor method (``call_method``), anything
else a function (``call_function``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .node_sets import calls_one_of

ADDS = frozenset(
    {
        operator.add,  # a + b
        operator.iadd,  # a += b
        torch.add,  # torch.add(a, b, alpha=2)
        torch.ops.aten.add.Tensor,
        "add",  # a.add(b)
        "add_",
        "__add__",
        "__iadd__",
    }
)
INPLACE_ADDS = frozenset({operator.iadd, "add_", "__iadd__"})


@dataclass(frozen=True)
class AddMatch:
    """``out = lhs + alpha * rhs``; ``inplace`` when ``lhs`` is mutated (``x += y``)."""

    lhs: fx.Node
    rhs: fx.Node
    alpha: float
    inplace: bool


def match_residual_add(node: fx.Node) -> AddMatch | None:
    """The add `node` performs, if it adds two graph values (scalars and constants excluded).

    None rather than a `Skip`: most nodes are not adds, and nothing reports on them."""
    if not calls_one_of(node, ADDS):
        return None
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    lhs, rhs = node.args
    if not (isinstance(lhs, fx.Node) and isinstance(rhs, fx.Node)):
        return None
    alpha = node.kwargs.get("alpha", 1.0)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None
    return AddMatch(lhs, rhs, float(alpha), node.target in INPLACE_ADDS)
