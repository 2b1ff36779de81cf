"""The hand-off of a chain's n streams across a graph break (`hcpass.runtime.handoff`), without
Dynamo: what a graph that ends a chain leaves behind (`leave`), what the next graph gets
(`enter`), the gradient the state gets through the break, and the errors when the stream
between the graphs is not the one the earlier graph returned.

The converted module's site lookup is a stub: anchors are named by identity, and the plan says
site ``b`` follows site ``a``. fp64; values compared exactly or within 1e-12."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from hcpass.runtime.handoff import Handoffs, StreamInput, StreamOutput, enter, leave

STREAMS = 3


class ChainLookup:
    """The plan: site ``a`` starts the chain, ``b`` continues it after a graph break."""

    def __init__(self, anchors: dict[str, torch.Tensor]) -> None:
        self.key_of = {id(anchor): key for key, anchor in anchors.items()}

    def site_key(self, anchor: torch.Tensor) -> str:
        return self.key_of[id(anchor)]

    def follows(self, key: str) -> str | None:
        return {"a": None, "b": "a"}[key]

    def site_label(self, key: str) -> str:
        return f"blocks.{key}"


@pytest.fixture
def anchors() -> dict[str, torch.Tensor]:
    return {key: torch.zeros(1) for key in ("a", "b")}


def state_and_stream() -> tuple[torch.Tensor, torch.Tensor]:
    """An n-stream state as a graph returns it, and its collapse (the visible output)."""
    state = torch.randn(STREAMS, 2, 4, dtype=torch.float64)
    return state, state.mean(0)


def left(handoffs: Handoffs, lookup: ChainLookup, anchor: torch.Tensor) -> torch.Tensor:
    """The stream a graph ending at site ``a`` returns; its state stays in `handoffs`."""
    state, collapsed = state_and_stream()
    (visible,) = leave(handoffs, lookup, [StreamOutput(0, 1)], (None, anchor), (collapsed, state))
    return visible


def test_a_chain_that_starts_at_a_graph_input_enters_as_n_copies(anchors):
    x = torch.randn(2, 4, dtype=torch.float64)
    entry = StreamInput(index=0, anchor=1, streams=STREAMS)
    lookup = ChainLookup(anchors)
    (state,) = enter(Handoffs(), lookup, [entry], (x, anchors["a"]), dense=False)
    assert torch.equal(state, x.expand(STREAMS, 2, 4))
    assert state.stride()[0] == 0  # copies by broadcasting, until a compiled graph needs them
    (dense,) = enter(Handoffs(), lookup, [entry], (x, anchors["a"]), dense=True)
    assert dense.is_contiguous() and torch.equal(dense, state)


def test_leave_keeps_the_returned_state_and_returns_the_graphs_own_outputs(anchors):
    state, collapsed = state_and_stream()
    other = torch.ones(1)
    handoffs, lookup = Handoffs(), ChainLookup(anchors)
    outputs = [StreamOutput(index=0, anchor=0)]
    visible = leave(handoffs, lookup, outputs, (anchors["a"],), (collapsed, other, state))
    assert list(visible) == [collapsed, other]
    kept = handoffs.find(collapsed)
    assert kept.state is state and kept.producer == "a"


def test_a_continued_chain_enters_with_the_state_kept_for_its_stream(anchors):
    handoffs, lookup = Handoffs(), ChainLookup(anchors)
    state, collapsed = state_and_stream()
    leave(handoffs, lookup, [StreamOutput(0, 0)], (anchors["a"],), (collapsed, state))
    entry = StreamInput(index=0, anchor=1, streams=STREAMS)
    # FSDP2's hooks pass a view of the stream: the same memory, read the same way
    for stream in (collapsed, collapsed.view(2, 4)):
        (entered,) = enter(handoffs, lookup, [entry], (stream, anchors["b"]), dense=False)
        torch.testing.assert_close(entered, state, rtol=0, atol=1e-12)


def test_through_the_break_the_state_gets_the_gradient_it_would_get_without_it(anchors):
    # state -> (collapse, Python between the graphs, enter) -> entered: d entered / d state
    # is the identity, though the entered state is built from the collapsed stream too
    handoffs, lookup = Handoffs(), ChainLookup(anchors)
    state = torch.randn(STREAMS, 2, 4, dtype=torch.float64, requires_grad=True)
    collapsed = state.mean(0)
    leave(handoffs, lookup, [StreamOutput(0, 0)], (anchors["a"],), (collapsed, state))
    entry = StreamInput(index=0, anchor=1, streams=STREAMS)
    (entered,) = enter(handoffs, lookup, [entry], (collapsed, anchors["b"]), dense=False)
    collapsed.retain_grad()
    upstream = torch.randn(STREAMS, 2, 4, dtype=torch.float64)
    entered.backward(upstream)
    torch.testing.assert_close(state.grad, upstream, rtol=0, atol=1e-12)
    # and the stream between the graphs gets the streams' sum, so backward hooks on the code
    # between them (FSDP2's) fire when that code's gradient is computed
    torch.testing.assert_close(collapsed.grad, upstream.sum(0), rtol=0, atol=1e-12)


def test_a_stream_replaced_between_the_graphs_is_an_error_naming_the_sites(anchors):
    handoffs, lookup = Handoffs(), ChainLookup(anchors)
    stream = left(handoffs, lookup, anchors["a"])
    entry = StreamInput(index=0, anchor=1, streams=STREAMS)
    message = (
        "site 'blocks.b' continues the residual chain of 'blocks.a' across a graph break, but "
        "its stream arrived without the chain's 3 streams"
    )
    with pytest.raises(RuntimeError, match=message):
        enter(handoffs, lookup, [entry], (stream.clone(), anchors["b"]), dense=False)
    stream.add_(1)  # written in place: not the value the state belongs to any more
    with pytest.raises(RuntimeError, match=message):
        enter(handoffs, lookup, [entry], (stream, anchors["b"]), dense=False)


def test_a_state_left_by_another_site_than_the_plan_says_is_an_error(anchors):
    handoffs, lookup = Handoffs(), ChainLookup(anchors)
    stream = left(handoffs, lookup, anchors["b"])  # b's streams, where b expects a's
    entry = StreamInput(index=0, anchor=1, streams=STREAMS)
    with pytest.raises(RuntimeError, match="the modules ran in another order than when"):
        enter(handoffs, lookup, [entry], (stream, anchors["b"]), dense=False)


def test_a_state_is_freed_once_its_stream_is_gone(anchors):
    handoffs, lookup = Handoffs(), ChainLookup(anchors)
    stream = left(handoffs, lookup, anchors["a"])
    state = weakref.ref(handoffs.find(stream).state)
    del stream
    gc.collect()
    left(handoffs, lookup, anchors["a"])  # the next graph's exit drops the dead entries
    assert state() is None
