"""The spellings of a tensor + tensor add in a Dynamo graph."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx


@dataclass(frozen=True)
class AddMatch:
    """``out = lhs + alpha * rhs``; ``inplace`` when ``lhs`` is mutated (``x += y``)."""

    lhs: fx.Node
    rhs: fx.Node
    alpha: float
    inplace: bool


class AddPattern:
    """One way of writing an add. Subclasses set `targets` and `op`, may override `match`."""

    op: ClassVar[str] = "call_function"
    targets: ClassVar[tuple[object, ...]]
    inplace_targets: ClassVar[tuple[object, ...]] = ()

    def match(self, node: fx.Node) -> AddMatch | None:
        if node.op != self.op or node.target not in self.targets:
            return None
        if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
            return None
        lhs, rhs = node.args
        if not (isinstance(lhs, fx.Node) and isinstance(rhs, fx.Node)):
            return None
        alpha = node.kwargs.get("alpha", 1.0)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            return None
        return AddMatch(lhs, rhs, float(alpha), node.target in self.inplace_targets)


class OperatorAdd(AddPattern):
    targets = (operator.add, operator.iadd)
    inplace_targets = (operator.iadd,)


class TorchAdd(AddPattern):
    targets = (torch.add, torch.ops.aten.add.Tensor)


class TensorAddMethod(AddPattern):
    op = "call_method"
    targets = ("add", "add_", "__add__", "__iadd__")
    inplace_targets = ("add_", "__iadd__")


# Add a spelling: append an instance (the order is the matching order).
PATTERNS: list[AddPattern] = [OperatorAdd(), TorchAdd(), TensorAddMethod()]


def match_residual_add(node: fx.Node) -> AddMatch | None:
    """The add `node` performs, if it adds two graph values (scalars and constants excluded)."""
    for pattern in PATTERNS:
        found = pattern.match(node)
        if found is not None:
            return found
    return None
