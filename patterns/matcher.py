"""A small matcher for multi-node patterns of fixed shape, declared as data.

A `Pattern` starts at a root node and captures further nodes by name, each `Step` searching
the users of a node captured before it. A step that finds nothing skips the match with the
step's reason; a step that finds several candidates tries each in turn (in the order of the
node's users), and if all fail, the last one's reason stands. When every step has found its
node, the captures become the pattern's typed result (`Pattern.build`), and the caller's
`where` check may still turn it down.

Why not ``torch._inductor.pattern_matcher``: its patterns are trees matched upwards, from an
output through each node's arguments, and an inner node must have exactly the users the
pattern names. The patterns hcpass needs are found from a node downwards: the site boundary
(`hcpass.patterns.site_boundary`) through users it shares with the rest of the graph (a
merge has several readers; the coefficients have three outputs), the spelled-out RMSNorm
(`hcpass.patterns.scale_invariant_norm`) from the value it normalises; and each way it can
fail needs a reason a user reads in the log, where Inductor's ``FailedMatch`` carries a
debugging message. Its API is also private and changes between torch releases; this module
is small and has none.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import EllipsisType
from typing import Generic, TypeVar

from torch import fx

from .result import Match, Skip

T = TypeVar("T")
Captured = dict[str, object]  # capture name -> node (or, for `Outputs`, the nodes by index)


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()  # an argument the pattern does not constrain


@dataclass(frozen=True)
class Call:
    """A call of `target` -- a function, a tensor method (by name), or a frozenset of them --
    whose positional arguments are `args` and keyword arguments `kwargs`.

    Each expected argument is the name of a node captured before (a string), `ANY`, a type
    (any constant of that type: ``float`` for an epsilon), or a constant compared with ``==``.
    A trailing ``...`` in `args` lets any further positional arguments follow; `kwargs` names
    exactly the keywords the call has (none by default), or is ``...`` to leave them, like the
    spellings of ``mean(x, -1, keepdim=True)``, to the pattern's `where` check."""

    target: object
    args: tuple[object, ...]
    kwargs: Mapping[str, object] | EllipsisType = field(default_factory=dict)

    def matches(self, node: fx.Node, captured: Captured) -> bool:
        targets = self.target if isinstance(self.target, frozenset) else {self.target}
        if node.op not in ("call_function", "call_method") or node.target not in targets:
            return False
        expected = self.args
        if expected and expected[-1] is Ellipsis:
            expected = expected[:-1]
            if len(node.args) < len(expected):
                return False
        elif len(node.args) != len(expected):
            return False
        if self.kwargs is not Ellipsis:
            if node.kwargs.keys() != self.kwargs.keys():
                return False
            if not all(_fits(node.kwargs[k], want, captured) for k, want in self.kwargs.items()):
                return False
        return all(
            _fits(actual, want, captured)
            for actual, want in zip(node.args, expected)  # noqa: B905 (prefix under `...`)
        )


class OneOf:
    """Any of `calls`: the spellings of one step, such as ``m + eps`` and ``eps + m``."""

    def __init__(self, *calls: Call) -> None:
        self.calls = calls

    def matches(self, node: fx.Node, captured: Captured) -> bool:
        return any(call.matches(node, captured) for call in self.calls)

    def __repr__(self) -> str:
        return f"OneOf{self.calls!r}"


def _fits(actual: object, want: object, captured: Captured) -> bool:
    if want is ANY:
        return True
    if isinstance(want, str):
        return actual is captured[want]
    if isinstance(want, type):
        return isinstance(actual, want)
    return not isinstance(actual, fx.Node) and actual == want


@dataclass(frozen=True)
class User:
    """Captures as `name` a user of the node captured as `of` that is `call` -- its only user
    when `sole` (the match will change what that node computes, and no other reader may see
    it); `missing` is the reason to skip when there is none (a function of the `of` node, to
    name what it found)."""

    name: str
    of: str
    call: Call | OneOf
    missing: str | Callable[[fx.Node], str]
    sole: bool = False

    def candidates(self, captured: Captured) -> list[object]:
        users = list(captured[self.of].users)
        if self.sole and len(users) != 1:
            return []
        return [u for u in users if self.call.matches(u, captured)]


@dataclass(frozen=True)
class Outputs:
    """Captures as `name` the users of the tuple-valued node `of` by the output they index
    (``dict[int, list[fx.Node]]``); there is none if any user takes the tuple whole."""

    name: str
    of: str
    missing: str

    def candidates(self, captured: Captured) -> list[object]:
        outputs: dict[int, list[fx.Node]] = {}
        for user in captured[self.of].users:
            if not Call(operator.getitem, (self.of, ...)).matches(user, captured):
                return []
            outputs.setdefault(user.args[1], []).append(user)
        return [outputs]


Step = User | Outputs


@dataclass(frozen=True)
class Pattern(Generic[T]):
    """Nodes reached from a root `call` (captured as `root`) through `steps`; a match is
    ``build(**captures)``."""

    root: str
    call: Call | OneOf
    steps: tuple[Step, ...]
    build: Callable[..., T]

    def roots(self, graph: fx.Graph) -> list[fx.Node]:
        """The nodes a match may start at, in graph order."""
        return [n for n in graph.nodes if self.call.matches(n, {})]

    def match(
        self, root: fx.Node, where: Callable[[T], Skip | None] | None = None
    ) -> Match[T] | Skip:
        """The match starting at `root` (one of `roots`) that `where` accepts, or why there
        is none."""
        return self._search(self.steps, {self.root: root}, where)

    def _search(
        self, steps: tuple[Step, ...], captured: Captured, where: Callable[[T], Skip | None] | None
    ) -> Match[T] | Skip:
        if not steps:
            found = self.build(**captured)
            rejected = where(found) if where is not None else None
            return rejected if rejected is not None else Match(found)
        step, rest = steps[0], steps[1:]
        missing = step.missing
        outcome: Match[T] | Skip = Skip(
            missing if isinstance(missing, str) else missing(captured[step.of])
        )
        for candidate in step.candidates(captured):
            outcome = self._search(rest, {**captured, step.name: candidate}, where)
            if isinstance(outcome, Match):
                break
        return outcome
