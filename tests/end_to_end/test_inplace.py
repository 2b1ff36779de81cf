"""In-place writes to the residual stream: a converted model computes what the original did,
outputs, gradients and the writes its caller sees.

The rewrite moves each site's reads of the stream to its n-stream state. A write the graph
orders after a read (an in-place op whose result later readers use) moves with it; a write
through a view or by item assignment (``x[..., :k] += y``, ``x[i] = y``) is not a dependence
any reader has in the graph, and one into a graph input is visible to the caller: sites on
such streams are skipped, with a reason."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hcpass
from tests import models

WIDTH = 8


def _seeded(model_class, *args):
    """A seeded model, a copy of it (the original) and an input."""
    torch.manual_seed(0)
    model = model_class(*args)
    return model, copy.deepcopy(model), torch.randn(2, 3, WIDTH)


class AddsIntoItsInput(nn.Module):
    """``x += f(x)`` on the caller's tensor: every add writes into it, not only the first."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.g, self.h = (nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, x):
        x += self.f(x)
        x += self.g(x)
        y = x * 2
        return y + self.h(y)


def test_every_add_into_a_graph_input_is_skipped_and_the_caller_sees_its_writes():
    model, original, x = _seeded(AddsIntoItsInput)
    report = hcpass.explain(model, (x.clone(),))
    assert [(s.status, s.reason) for s in report.rows] == [
        ("skipped", "in-place add mutates a graph input or a view"),
        ("skipped", "in-place add mutates a graph input or a view"),
        ("rewritten", ""),
    ]
    converted = hcpass.convert(model, (x.clone(),), streams=4)
    mine, theirs = x.clone(), x.clone()
    with torch.no_grad():
        torch.testing.assert_close(converted(mine), original(theirs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def _slice_add_on_the_stream(block, x):
    x[..., :4] += block.f(x[..., :4].clone())
    return x


def _item_assignment_on_a_copy(block, x):
    y = x.clone()
    y[..., :4] = block.f(x[..., :4])
    return y


def _slice_add_on_a_copy(block, x):
    y = x.clone()
    y[..., :4] += block.f(x[..., :4])
    return y


WRITES_THROUGH_VIEWS = {
    "slice-add-on-the-stream": _slice_add_on_the_stream,
    "item-assignment-on-a-copy": _item_assignment_on_a_copy,
    "slice-add-on-a-copy": _slice_add_on_a_copy,
}


class WriteBetweenSites(nn.Module):
    def __init__(self, write) -> None:
        super().__init__()
        self.write = write
        self.f = nn.Linear(4, 4)
        self.g, self.h = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        x = x + self.g(x)
        y = self.write(self, x)
        return y + self.h(y)


@pytest.mark.parametrize("write", sorted(WRITES_THROUGH_VIEWS))
def test_a_site_on_a_stream_written_through_a_view_is_skipped(write):
    model, original, x = _seeded(WriteBetweenSites, WRITES_THROUGH_VIEWS[write])
    report = hcpass.explain(model, (x,))
    assert report.rows[0].name == "g" and report.rows[0].status == "rewritten"
    last = report.rows[-1]
    assert last.status == "skipped"
    assert last.reason.startswith("the stream is also written in place through a view")
    models.assert_computes_like(hcpass.convert(model, (x,), streams=4), original, x)


class InPlaceOpBetweenSites(nn.Module):
    """``y.mul_(2)``: later readers of y read the op's result in the graph, so the rewrite
    keeps the order and both sites are rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self.g, self.h = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        x = x + self.g(x)
        y = x.clone()
        y.mul_(2.0)
        return y + self.h(y)


def test_an_in_place_op_the_graph_orders_keeps_both_sites():
    model, original, x = _seeded(InPlaceOpBetweenSites)
    assert [s.status for s in hcpass.explain(model, (x,)).rows] == ["rewritten", "rewritten"]
    converted = hcpass.convert(model, (x,), streams=4)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-5, atol=1e-5)
