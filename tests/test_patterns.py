"""The declared graph patterns (`hcpass.patterns`) on small hand-built FX graphs: which nodes
each matches, what it captures, and the reason it gives when it does not match."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from hcpass.patterns.node_sets import is_cast, is_stream_op, is_view, mutates_first_arg
from hcpass.patterns.residual_add import AddMatch, match_residual_add
from hcpass.patterns.result import Match, Skip
from hcpass.patterns.site_boundary import SITE_BOUNDARY, SiteBoundary
from torch import fx

OPS = torch.ops.hcpass


def node(op: str, target: object, args: tuple = (), kwargs: dict | None = None) -> fx.Node:
    """One node of kind `op` calling `target` on two placeholders ``a``, ``b`` (named by
    string in `args`) or constants."""
    graph = fx.Graph()
    values = {name: graph.placeholder(name) for name in ("a", "b")}
    args = tuple(values.get(a, a) if isinstance(a, str) else a for a in args)
    return graph.create_node(op, target, args, kwargs or {})


# -- residual adds -----------------------------------------------------------------------------

ADD_SPELLINGS = [
    ("call_function", operator.add, {}, 1.0, False),  # a + b
    ("call_function", operator.iadd, {}, 1.0, True),  # a += b
    ("call_function", torch.add, {"alpha": 2}, 2.0, False),  # torch.add(a, b, alpha=2)
    ("call_function", torch.ops.aten.add.Tensor, {}, 1.0, False),
    ("call_method", "add", {}, 1.0, False),  # a.add(b)
    ("call_method", "add_", {"alpha": 0.5}, 0.5, True),
    ("call_method", "__add__", {}, 1.0, False),
    ("call_method", "__iadd__", {}, 1.0, True),
]


@pytest.mark.parametrize(("op", "target", "kwargs", "alpha", "inplace"), ADD_SPELLINGS)
def test_every_add_spelling_matches(op, target, kwargs, alpha, inplace):
    add = node(op, target, ("a", "b"), kwargs)
    a, b = add.args
    assert match_residual_add(add) == AddMatch(a, b, alpha, inplace)


@pytest.mark.parametrize(
    ("op", "target", "args", "kwargs"),
    [
        ("call_function", operator.add, ("a", 1.0), {}),  # a scalar, not a tensor
        ("call_function", torch.add, ("a", "b"), {"alpha": True}),  # alpha must be a number
        ("call_function", torch.add, ("a", "b"), {"out": None}),
        ("call_function", operator.sub, ("a", "b"), {}),
        ("call_module", "add", ("a", "b"), {}),  # a submodule named "add" is not Tensor.add
    ],
)
def test_other_nodes_are_not_adds(op, target, args, kwargs):
    assert match_residual_add(node(op, target, args, kwargs)) is None


# -- single-node sets --------------------------------------------------------------------------


def test_per_position_ops_may_sit_on_a_stream_and_batch_norm_may_not():
    on_stream = [
        node("call_function", F.layer_norm, ("a",)),
        node("call_function", F.gelu, ("a",)),
        node("call_method", "relu", ("a",)),
        node("call_function", F.dropout, ("a",)),
        node("call_method", "float", ("a",)),
        node("call_method", "contiguous", ("a",)),
    ]
    assert all(is_stream_op(n) for n in on_stream)
    # batch_norm's training statistics would mix the streams folded into the batch
    assert not is_stream_op(node("call_function", F.batch_norm, ("a",)))
    assert not is_stream_op(node("call_module", "relu", ("a",)))


def test_to_is_a_cast_and_may_alias_its_input():
    to = node("call_method", "to", ("a", torch.float32))
    assert is_cast(to) and is_view(to)
    assert is_view(node("call_function", operator.getitem, ("a", 0)))
    assert not is_cast(node("call_method", "view", ("a", -1)))


def test_what_mutates_its_first_argument():
    assert mutates_first_arg(node("call_function", operator.iadd, ("a", "b")))
    assert mutates_first_arg(node("call_method", "mul_", ("a", 2)))
    assert mutates_first_arg(node("call_function", F.relu, ("a",), {"inplace": True}))
    assert not mutates_first_arg(node("call_method", "__getitem__", ("a", 0)))
    assert not mutates_first_arg(node("call_function", F.relu, ("a",)))


# -- the site boundary -------------------------------------------------------------------------


def boundary_graph(pre_reads_merge: bool = True, coeffs_used_whole: bool = False) -> fx.Graph:
    """``merge = post_res(..)``, the next site's ``coeffs(merge, ..)`` and ``pre(merge, H_pre)``."""
    graph = fx.Graph()
    x, y, h_post, h_res, phi, alpha, bias = (
        graph.placeholder(name) for name in ("x", "y", "h_post", "h_res", "phi", "alpha", "bias")
    )
    merge = graph.call_function(OPS.post_res.default, (x, y, h_post, h_res))
    coeffs = graph.call_function(OPS.coeffs.default, (merge, phi, alpha, bias, "spec"))
    h = [graph.call_function(operator.getitem, (coeffs, i)) for i in range(3)]
    pre = graph.call_function(OPS.pre.default, (merge if pre_reads_merge else x, h[0]))
    graph.output((pre, merge, *h[1:], *([coeffs] if coeffs_used_whole else [])))
    return graph


def nodes(graph: fx.Graph) -> dict[str, fx.Node]:
    return {n.name: n for n in graph.nodes}


def test_the_site_boundary_captures_merge_coeffs_outputs_and_pre():
    graph = boundary_graph()
    (merge,) = SITE_BOUNDARY.roots(graph)
    n = nodes(graph)
    assert SITE_BOUNDARY.match(merge) == Match(
        SiteBoundary(
            merge=n["post_res_default"],
            coeffs=n["coeffs_default"],
            outputs={0: [n["getitem"]], 1: [n["getitem_1"]], 2: [n["getitem_2"]]},
            h_pre=n["getitem"],
            pre=n["pre_default"],
        )
    )


def test_a_merge_no_coefficients_read_is_skipped_naming_its_readers():
    graph = fx.Graph()
    merge = graph.call_function(OPS.post_res.default, tuple(graph.placeholder(c) for c in "xyab"))
    graph.output(graph.call_method("flatten", (merge, 0, 1)))
    assert SITE_BOUNDARY.match(merge) == Skip(
        "no site reads its output directly (it goes to flatten)"
    )


def test_coefficients_used_whole_are_skipped():
    (merge,) = SITE_BOUNDARY.roots(boundary_graph(coeffs_used_whole=True))
    assert SITE_BOUNDARY.match(merge) == Skip(
        "the next site's coefficients are used whole, not indexed"
    )


def test_a_branch_that_does_not_read_the_merge_is_skipped():
    (merge,) = SITE_BOUNDARY.roots(boundary_graph(pre_reads_merge=False))
    assert SITE_BOUNDARY.match(merge) == Skip(
        "the next site's branch input is not pre(merge, H_pre)"
    )


def test_where_turns_a_match_down_with_its_own_reason():
    (merge,) = SITE_BOUNDARY.roots(boundary_graph())
    assert SITE_BOUNDARY.match(merge, where=lambda found: Skip("no room")) == Skip("no room")


def test_a_merge_two_sites_read_matches_the_first_boundary_where_accepts():
    """A parallel block's two branches both read the merge: each has its coefficients."""
    graph = boundary_graph()
    n = nodes(graph)
    merge, output = n["post_res_default"], n["output"]
    with graph.inserting_before(output):
        coeffs = graph.call_function(OPS.coeffs.default, (merge, *n["coeffs_default"].args[1:]))
        h_pre = graph.call_function(operator.getitem, (coeffs, 0))
        pre = graph.call_function(OPS.pre.default, (merge, h_pre))
    output.args = ((*output.args[0], pre),)

    def not_the_first(found: SiteBoundary) -> Skip | None:
        return Skip("taken") if found.coeffs is n["coeffs_default"] else None

    found = SITE_BOUNDARY.match(merge, where=not_the_first)
    assert isinstance(found, Match) and (found.value.coeffs, found.value.pre) == (coeffs, pre)
