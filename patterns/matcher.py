"""A small matcher for multi-node patterns of fixed shape, declared as data.

A `Pattern` starts at a root node and captures further nodes by name, each `Step` searching
the users of a node captured before it. A step that finds nothing skips the match with the
step's reason; a step that finds several candidates tries each in turn (in the order of the
node's users), and if all fail, the last one's reason stands. When every step has found its
node, the captures become the pattern's typed result (`Pattern.build`), and the caller's
`where` check may still turn it down.

Why not ``torch._inductor.pattern_matcher``: its patterns are trees matched upwards, from an
output through each node's arguments, and an inner node must have exactly the users the
pattern names. The pattern hcpass needs (`hcpass.patterns.site_boundary`) is found from a
node downwards, through users it shares with the rest of the graph (a merge has several
readers; the coefficients have three outputs), and each way it can fail needs a reason a
user reads in the log, where Inductor's ``FailedMatch`` carries a debugging message. Its API
is also private and changes between torch releases; this module is small and has none.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from torch import fx

from .result import Match, Skip

T = TypeVar("T")
Captured = dict[str, object]  # capture name -> node (or, for `Outputs`, the nodes by index)


@dataclass(frozen=True)
class Call:
    """A ``call_function`` node of `target`, without keyword arguments, whose arguments are
    `args`: each the name of a node captured before (a string) or a constant; a trailing
    ``...`` lets any further arguments follow."""

    target: object
    args: tuple[object, ...]

    def matches(self, node: fx.Node, captured: Captured) -> bool:
        if node.op != "call_function" or node.target is not self.target or node.kwargs:
            return False
        expected = self.args
        if expected and expected[-1] is Ellipsis:
            expected = expected[:-1]
            if len(node.args) < len(expected):
                return False
        elif len(node.args) != len(expected):
            return False
        return all(
            actual is captured[want] if isinstance(want, str) else actual == want
            for actual, want in zip(node.args, expected)  # noqa: B905 (prefix under `...`)
        )


@dataclass(frozen=True)
class User:
    """Captures as `name` a user of the node captured as `of` that is `call`; `missing` is the
    reason to skip when there is none (a function of the `of` node, to name what it found)."""

    name: str
    of: str
    call: Call
    missing: str | Callable[[fx.Node], str]

    def candidates(self, captured: Captured) -> list[object]:
        return [u for u in captured[self.of].users if self.call.matches(u, captured)]


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
    call: Call
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
