"""Carry a residual chain's n streams across a graph break.

Dynamo splits a forward into several graphs at graph breaks (and at every call of an FSDP2
``fully_shard``ed module), and each graph is rewritten on its own. Left alone, a chain whose
stream leaves one graph and enters the next would be collapsed to one stream at the exit and
expanded to n fresh copies at the entry: a different model from the one `convert` planned.
Instead:

- a rewritten graph that returns the last value of a chain also returns the chain's n-stream
  state (an extra output, `StreamOutput`). The Python code between graphs sees only the
  collapsed stream; the runtime keeps the state for the rest of the forward, keyed by the
  collapsed tensor (`Handoffs`, one per forward call, so threads don't mix);
- a graph whose chain starts at one of its inputs takes the n-stream state as an extra input
  (`StreamInput`): n copies of the input where the plan says the chain starts there, else
  the kept state -- found when the input is the collapsed tensor, or a view of it with the
  same layout that nothing has written to since (FSDP2's hooks pass a view). A chain the plan
  says continues whose state is not found is an error naming the site, never a restart.

Gradients. The entering state is ``X + (x - X.mean(0))``: its value is X (x is X's collapse),
X gets its gradient G minus G's stream mean, and x gets G's stream sum. That sum flows back
through the Python between the graphs (so FSDP2's backward hooks fire on time) to the collapse
``x = X.mean(0)`` in the earlier graph, which hands X the stream mean back: in total X gets
exactly G, the gradient it would get without the break.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hcpass.frontend.capture import Layout, layout


@dataclass(frozen=True)
class StreamInput:
    """A graph input that is a chain's stream; the graph takes its n-stream state too."""

    index: int  # the graph input holding the (collapsed) stream
    anchor: int  # the graph input keying the mixer of the chain's first site here
    streams: int


@dataclass(frozen=True)
class StreamOutput:
    """A graph output that is a chain's last stream value; its n-stream state follows the
    graph's own outputs."""

    index: int  # the graph output holding the collapsed stream
    anchor: int  # the graph input keying the mixer of the chain's last site here


class ChainLookup(Protocol):
    """What the hand-off needs of the converted module's site lookup (`SiteLookup` in
    `hcpass.runtime.lookup`): which site a graph's anchor parameter keys, and which site comes
    before it in its planned chain."""

    def site_key(self, anchor: torch.Tensor) -> str: ...

    def follows(self, key: str) -> str | None: ...

    def site_label(self, key: str) -> str: ...


@dataclass
class _Kept:
    collapsed: weakref.ref[torch.Tensor]
    layout: Layout
    state: torch.Tensor
    producer: str  # mixer key of the site whose output the state is


class Handoffs:
    """The n-stream states of chains that left a graph during one forward call.

    Entries live as long as their collapsed tensor: without grad, a state is freed when the
    Python code drops the stream it belongs to."""

    def __init__(self) -> None:
        self._kept: list[_Kept] = []

    def keep(self, collapsed: torch.Tensor, state: torch.Tensor, producer: str) -> None:
        self._kept = [k for k in self._kept if k.collapsed() is not None]
        self._kept.append(_Kept(weakref.ref(collapsed), layout(collapsed), state, producer))

    def find(self, stream: torch.Tensor) -> _Kept | None:
        wanted = layout(stream)
        return next(
            (k for k in self._kept if k.collapsed() is not None and k.layout == wanted), None
        )


def enter(
    handoffs: Handoffs,
    lookup: ChainLookup,
    inputs: Sequence[StreamInput],
    args: Sequence[Any],
    dense: bool,
) -> list[torch.Tensor]:
    """The n-stream state of each stream input, in the order of the graph's extra inputs.

    `dense`: the graph was compiled for contiguous states (Inductor asserts input strides),
    so the n copies of a starting chain are materialised."""
    states = []
    for entry in inputs:
        x = args[entry.index]
        key = lookup.site_key(args[entry.anchor])
        previous = lookup.follows(key)
        state = _state(handoffs, lookup, entry, x, key, previous)
        states.append(state.contiguous() if dense else state)
    return states


def _state(
    handoffs: Handoffs,
    lookup: ChainLookup,
    entry: StreamInput,
    x: torch.Tensor,
    key: str,
    previous: str | None,
) -> torch.Tensor:
    """n copies of `x` where the chain starts, else the state kept for `x`."""
    if previous is None:
        return x.unsqueeze(0).expand(entry.streams, *x.shape)
    kept = handoffs.find(x)
    if kept is None:
        raise RuntimeError(
            f"hcpass: site {lookup.site_label(key)!r} continues the residual chain of "
            f"{lookup.site_label(previous)!r} across a graph break, but its stream arrived "
            f"without the chain's {entry.streams} streams: code between the graphs "
            "replaced the tensor (a copy, a cast, an in-place op). Pass the stream "
            "between the modules unchanged, or keep them in one graph."
        )
    if kept.producer != previous:
        raise RuntimeError(
            f"hcpass: site {lookup.site_label(key)!r} follows "
            f"{lookup.site_label(previous)!r} in the converted model's plan, but its "
            f"streams come from {lookup.site_label(kept.producer)!r}: the modules ran "
            "in another order than when the model was converted"
        )
    state = kept.state
    return state + (x - state.mean(0)).unsqueeze(0)


def leave(
    handoffs: Handoffs,
    lookup: ChainLookup,
    outputs: Sequence[StreamOutput],
    args: Sequence[Any],
    result: Sequence[Any],
) -> Sequence[Any]:
    """Keep the n-stream states a graph returned after its own outputs; return the latter."""
    if not outputs:
        return result
    visible, states = result[: -len(outputs)], result[-len(outputs) :]
    for entry, state in zip(outputs, states, strict=True):
        handoffs.keep(visible[entry.index], state, lookup.site_key(args[entry.anchor]))
    return visible


def compiled_regions(model: torch.nn.Module) -> list[str]:
    """Submodules compiled on their own (``block.compile(...)``, or ``torch.compile(block)``
    assigned back): the regional-compile pattern, in which each region is a graph of its own
    and chains cross from region to region."""
    from torch._dynamo.eval_frame import OptimizedModule

    def compiled(module: torch.nn.Module) -> bool:
        return (
            isinstance(module, OptimizedModule)
            or module.__dict__.get("_compiled_call_impl") is not None
        )

    # Asked on every forward: a walk without named_modules' names and memo first (a third
    # of its cost), names only where there is a region.
    stack = [model]
    while stack:
        module = stack.pop()
        if compiled(module):
            return [name for name, module in model.named_modules() if compiled(module)]
        stack.extend(child for child in module._modules.values() if child is not None)
    return []


def examples(inputs: Sequence[StreamInput], values: Sequence[Any]) -> list[torch.Tensor]:
    """Example n-stream states for compiling a graph (contiguous, as `enter(dense=True)`).

    `values` are the graph inputs' fake values as Dynamo traced them: a state built from a
    real tensor would give the compiled graph static sizes (a recompile per length under
    dynamic shapes), one built from the fake value shares its symbolic sizes."""
    return [
        values[e.index].unsqueeze(0).expand(e.streams, *values[e.index].shape).contiguous()
        for e in inputs
    ]
