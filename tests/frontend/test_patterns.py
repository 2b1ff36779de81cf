"""The declared graph patterns (`hcpass.patterns`) on small hand-built FX graphs: which nodes
each matches, what it captures, and the reason it gives when it does not match."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from hcpass.patterns.matcher import ANY, Call, OneOf, User
from hcpass.patterns.node_sets import is_cast, is_stream_op, is_view, mutates_first_arg
from hcpass.patterns.residual_add import AddMatch, match_residual_add
from hcpass.patterns.result import Match, Skip
from hcpass.patterns.scale_invariant_norm import Epsilon, ScaleInvariantNorm, norms_reading
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


# -- the matcher's calls -------------------------------------------------------------------------


def calls(*specs: tuple[str, object, tuple, dict]) -> tuple[fx.Node, list[fx.Node]]:
    """A placeholder ``a`` and, in one graph, a node per (op, target, args, kwargs) spec
    reading it (``"a"`` in args)."""
    graph = fx.Graph()
    a = graph.placeholder("a")
    made = [
        graph.create_node(op, target, tuple(a if x == "a" else x for x in args), kwargs)
        for op, target, args, kwargs in specs
    ]
    return a, made


def test_a_call_may_name_several_targets_keywords_and_wildcards():
    mean = Call(frozenset({"mean", torch.mean}), ("a", ANY), kwargs={"keepdim": True})
    a, (method, function, no_keepdim, total, by_keyword) = calls(
        ("call_method", "mean", ("a", -1), {"keepdim": True}),
        ("call_function", torch.mean, ("a", 0), {"keepdim": True}),
        ("call_method", "mean", ("a", -1), {}),
        ("call_method", "sum", ("a", -1), {"keepdim": True}),
        ("call_method", "mean", ("a",), {"dim": -1}),
    )
    assert mean.matches(method, {"a": a}) and mean.matches(function, {"a": a})
    assert not mean.matches(no_keepdim, {"a": a})  # the keywords must be the declared ones
    assert not mean.matches(total, {"a": a})
    assert Call("mean", ("a", ...), kwargs=...).matches(by_keyword, {"a": a})


def test_a_type_matches_any_constant_of_it_and_one_of_takes_either_order():
    plus_eps = OneOf(Call(operator.add, ("a", float)), Call(operator.add, (float, "a")))
    a, (after, before, integer, itself) = calls(
        ("call_function", operator.add, ("a", 1e-6), {}),
        ("call_function", operator.add, (1e-6, "a"), {}),
        ("call_function", operator.add, ("a", 1), {}),
        ("call_function", operator.add, ("a", "a"), {}),
    )
    assert plus_eps.matches(after, {"a": a}) and plus_eps.matches(before, {"a": a})
    assert not plus_eps.matches(integer, {"a": a}) and not plus_eps.matches(itself, {"a": a})


def test_a_sole_user_step_fails_when_the_node_has_other_readers():
    graph = fx.Graph()
    a = graph.placeholder("a")
    relu = graph.call_method("relu", (a,))
    graph.output((relu, graph.call_method("neg", (a,))))
    sole = User("relu", "a", Call("relu", ("a",)), missing="a is read by more", sole=True)
    assert sole.candidates({"a": a}) == []
    assert User("relu", "a", Call("relu", ("a",)), missing="").candidates({"a": a}) == [relu]


# -- scale-invariant norms ----------------------------------------------------------------------

CHANNELS = 6


def traced(fn) -> tuple[fx.Node, dict[str, fx.Node]]:
    """`fn(x)` traced, its nodes carrying Dynamo's ``example_value`` meta (from a (2, 3, C)
    input); returns the input and the nodes by name."""
    module = fx.symbolic_trace(fn)

    class Record(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            n.meta["example_value"] = result = super().run_node(n)
            return result

    Record(module).run(torch.randn(2, 3, CHANNELS))
    named = nodes(module.graph)
    return named["x"], named


def llama_rms_norm(x):
    c = x.to(torch.float32)
    variance = c.pow(2).mean(-1, keepdim=True)
    return c * torch.rsqrt(variance + 1e-6)


def test_a_spelled_out_rms_norm_through_a_cast_is_captured_with_its_epsilon():
    x, n = traced(llama_rms_norm)
    body = {n["to"], n["pow_1"], n["mean"], n["add"], n["rsqrt"], n["mul"]}
    assert norms_reading(x, x.users) == Match(
        [
            ScaleInvariantNorm(
                input=x,
                nodes=frozenset({n["to"], n["pow_1"], n["mul"]}),
                eps=Epsilon(n["add"], 1, 1e-6),
                body=frozenset(body),
            )
        ]
    )


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x * torch.rsqrt(torch.square(x).mean(dim=-1, keepdim=True) + 1e-5),
        lambda x: torch.rsqrt(1e-5 + x.pow(2).mean(2, keepdim=True)) * x,  # rank 3: dim 2 is last
        lambda x: x * torch.rsqrt(torch.mean(x**2, -1, True) + 1e-5),
    ],
    ids=["square-keywords", "eps-first-dim-2", "operator-pow"],
)
def test_every_spelling_of_an_rms_norm_matches(fn):
    x, _ = traced(fn)
    found = norms_reading(x, x.users)
    assert isinstance(found, Match) and len(found.value) == 1
    assert found.value[0].eps.value == 1e-5


def test_called_norms_capture_where_their_epsilon_is_written():
    x, n = traced(lambda x: F.layer_norm(x, (CHANNELS,), None, None, 1e-3) + F.rms_norm(x, (6,)))
    found = norms_reading(x, x.users)
    assert isinstance(found, Match)
    assert [norm.eps for norm in found.value] == [
        Epsilon(n["layer_norm"], "eps", 1e-3),  # fx writes it as a keyword
        Epsilon(n["rms_norm"], "eps", torch.finfo(torch.float32).eps),  # F.rms_norm's default
    ]


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (
            lambda x: x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6),
            "pow (pow_1), not a LayerNorm, and not an RMSNorm over the channels: its mean is not "
            "over the last dimension with keepdim=True",
        ),
        (
            lambda x: (x * torch.rsqrt((m := x.pow(2).mean(-1, keepdim=True)) + 1e-6), m),
            "pow (pow_1), not a LayerNorm, and not an RMSNorm over the channels: the mean of "
            "squares gets no epsilon, or has another reader",
        ),
        (
            lambda x: F.layer_norm(x, (3, CHANNELS)),  # over more than the channels
            "layer_norm (layer_norm), not a LayerNorm/RMSNorm over the channels",
        ),
        (lambda x: F.relu(x), "relu (relu), not a LayerNorm/RMSNorm over the channels"),
    ],
    ids=["mean-over-positions", "mean-read-twice", "layer-norm-over-two-dims", "relu"],
)
def test_what_is_not_a_scale_invariant_norm_is_skipped_with_the_step_that_failed(fn, reason):
    x, _ = traced(fn)
    assert norms_reading(x, x.users) == Skip(reason)
