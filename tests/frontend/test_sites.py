"""The front end on hand-built FX graphs, without Dynamo: which adds `find_sites` takes as
residual sites, how it groups them into chains, the reason it gives for every same-shape add
it skips; which chains Attention Residuals accept (`frontend.attnres`); and what `plan` makes
of the sites of several graphs (names, chain positions, the chain handed across a graph break).

Every graph is written the way Dynamo hands one to a backend (`tests.graphs.GraphBuilder`):
parameters are placeholders named after the model's parameters, widths are 4."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from hcpass.patterns.result import Match, Skip
from torch import fx, nn

from hcpass.frontend.attnres import chain_norms, keep_convertible
from hcpass.frontend.capture import CapturedGraph, parameter_name
from hcpass.frontend.plan import plan, site_name, site_names
from hcpass.frontend.sites import find_sites, normalize_inplace
from tests.graphs import GraphBuilder

WIDTH = 4


def block(g: GraphBuilder, x: fx.Node, name: str) -> fx.Node:
    """A pre-norm block's add: ``x + fc(ln(x))``."""
    branch = g.linear(g.layer_norm(x, f"{name}.ln", WIDTH), f"{name}.fc", WIDTH)
    return g.call(operator.add, x, branch)


def names(nodes) -> list[str]:
    return [n.name for n in nodes]


def skips(graph: fx.Graph) -> list[tuple[str, str]]:
    analysis = find_sites(graph, parameter_name)
    assert analysis.chains == []
    return [(s.node.name, s.reason) for s in analysis.skipped]


# -- sites and chains ----------------------------------------------------------------------------


def test_a_pre_norm_block_is_a_site_keyed_on_the_last_parameter_its_branch_reads():
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    add = block(g, x, "blocks.0")
    (chain,) = find_sites(g.output(add), parameter_name).chains
    (site,) = chain.sites
    assert chain.input is x and chain.stream_ops == []
    assert (site.node, site.stream, site.read) == (add, x, x)
    assert site.branch.name == "linear" and site.alpha == 1.0
    assert names(sorted(site.branch_nodes, key=list(g.graph.nodes).index)) == [
        "layer_norm",
        "linear",
    ]
    assert site.anchor_name == "blocks.0.fc.weight"
    assert (site.channel_dim, site.channels) == (2, WIDTH)


def test_blocks_in_sequence_form_one_chain_in_graph_order():
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    first = block(g, x, "blocks.0")
    second = block(g, first, "blocks.1")
    (chain,) = find_sites(g.output(second), parameter_name).chains
    assert [(s.stream, s.read) for s in chain.sites] == [(x, x), (first, first)]
    assert chain.stream_values == [x, first, second]


def test_parallel_blocks_add_to_the_first_sum_and_read_the_chain_input():
    # x + attn(h) + mlp(h), h = ln(x): one chain, the second site adds to x + attn(h)
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    h = g.layer_norm(x, "ln", WIDTH)
    first = g.call(operator.add, x, g.linear(h, "attn", WIDTH))
    second = g.call(operator.add, first, g.linear(h, "mlp", WIDTH))
    (chain,) = find_sites(g.output(second), parameter_name).chains
    assert [(s.stream, s.read) for s in chain.sites] == [(x, x), (first, x)]
    assert [s.anchor_name for s in chain.sites] == ["attn.weight", "mlp.weight"]


def test_a_post_norm_between_sites_is_lifted_onto_the_chain():
    # x = ln1(x + f(x)); x = ln2(x + g(x)): ln1 is a stream value, ln2 the chain's consumer
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    first = g.layer_norm(g.call(operator.add, x, g.linear(x, "f", WIDTH)), "ln1", WIDTH)
    second = g.call(operator.add, first, g.linear(first, "g", WIDTH))
    out = g.layer_norm(second, "ln2", WIDTH)
    (chain,) = find_sites(g.output(out), parameter_name).chains
    assert chain.stream_ops == [first]
    assert [s.read for s in chain.sites] == [x, first]


def test_an_add_whose_branch_reads_another_value_starts_a_new_chain():
    # a projection between two stacks: the second stack's branch reads proj(x), not x
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    first = block(g, x, "first")
    projected = g.linear(first, "proj", WIDTH)
    second = block(g, projected, "second")
    chains = find_sites(g.output(second), parameter_name).chains
    assert [c.input for c in chains] == [x, projected]


def test_a_broadcasting_add_is_no_candidate_at_all():
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    bias = g.parameter("bias", WIDTH)
    analysis = find_sites(g.output(g.call(operator.add, x, bias)), parameter_name)
    assert (analysis.chains, analysis.skipped) == ([], [])


def test_a_site_the_caller_vetoes_is_skipped_with_the_callers_reason():
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    graph = g.output(block(g, x, "blocks.0"))
    analysis = find_sites(
        graph, parameter_name, keep=lambda site: f"no mixer for {site.anchor_name}"
    )
    assert analysis.chains == []
    assert [(s.node.name, s.reason) for s in analysis.skipped] == [
        ("add", "no mixer for blocks.0.fc.weight")
    ]


def test_the_second_call_of_a_shared_block_is_keyed_on_its_next_parameter():
    # the weight keys the first call's mixer; the second call gets one of its own (the bias)
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    weight, bias = g.parameter("fc.weight", WIDTH, WIDTH), g.parameter("fc.bias", WIDTH)
    first = g.call(operator.add, x, g.call(F.linear, x, weight, bias))
    second = g.call(operator.add, first, g.call(F.linear, first, weight, bias))
    (chain,) = find_sites(g.output(second), parameter_name).chains
    assert [s.anchor_name for s in chain.sites] == ["fc.weight", "fc.bias"]


# -- skipped adds and their reasons --------------------------------------------------------------


def test_a_shared_block_with_one_parameter_has_none_left_for_its_second_call():
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    weight = g.parameter("fc.weight", WIDTH, WIDTH)
    first = g.call(operator.add, x, g.call(F.linear, x, weight))
    second = g.call(operator.add, first, g.call(F.linear, first, weight))
    analysis = find_sites(g.output(second), parameter_name)
    assert [s.node for c in analysis.chains for s in c.sites] == [first]
    assert [(s.node, s.reason) for s in analysis.skipped] == [
        (second, "every parameter of its branch already keys another site's mixer")
    ]


def test_an_elementwise_expression_is_not_a_block():
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    graph = g.output(g.call(operator.add, x, g.method("relu", x)))
    assert skips(graph) == [
        ("add", "branch reads no parameters (an elementwise expression, not a block)")
    ]


def test_an_alpha_on_the_stream_is_not_a_site():
    # torch.add(f(x), x, alpha=2) scales x, the stream
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    graph = g.output(g.call(torch.add, g.linear(x, "fc", WIDTH), x, alpha=2))
    assert skips(graph) == [("add", "torch.add(..., alpha=2.0) scales the stream, not the branch")]


def test_an_alpha_on_the_branch_is_the_sites_alpha():
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    graph = g.output(g.call(torch.add, x, g.linear(x, "fc", WIDTH), alpha=0.5))
    (site,) = find_sites(graph, parameter_name).sites
    assert site.alpha == 0.5


def test_a_sum_of_two_graph_inputs_may_be_a_residual_split_by_a_graph_break():
    g = GraphBuilder()
    x, y = g.input("x", 2, 3, WIDTH), g.input("y", 2, 3, WIDTH)
    assert skips(g.output(g.call(operator.add, x, y))) == [
        (
            "add",
            "the operands share no input in this graph, both come from its inputs: a sum of "
            "two inputs, or a residual whose branch spans a graph break (the report's graph "
            "breaks say where Dynamo split the forward)",
        )
    ]


def test_a_sum_of_two_embeddings_is_not_a_residual():
    g = GraphBuilder()
    x, y = g.input("x", 2, 3, WIDTH), g.input("y", 2, 3, WIDTH)
    graph = g.output(g.call(operator.add, g.linear(x, "a", WIDTH), g.linear(y, "b", WIDTH)))
    assert skips(graph) == [
        ("add", "the operands share no input (not a residual: e.g. an embedding sum)")
    ]


def test_a_projection_shortcut_is_not_a_residual_and_ends_the_chain():
    # y = x + f(x), a site; then proj(y) + g(y): both operands read y, neither is y
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    y = block(g, x, "blocks.0")
    shortcut = g.call(operator.add, g.linear(y, "proj", WIDTH), g.linear(y, "g", WIDTH))
    analysis = find_sites(g.output(shortcut), parameter_name)
    assert [s.node for s in analysis.sites] == [y]
    assert [(s.node, s.reason) for s in analysis.skipped] == [
        (
            shortcut,
            "both operands are computed from stream 'add' but neither is the stream (a "
            "projection shortcut, which ends the chain, or an add inside a branch)",
        )
    ]


def test_a_projection_shortcut_outside_any_chain_is_not_a_residual():
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    graph = g.output(g.call(operator.add, g.linear(x, "proj", WIDTH), g.linear(x, "g", WIDTH)))
    assert skips(graph) == [
        ("add", "neither operand is computed from the other (both read 'x'): not a residual")
    ]


def test_a_residual_across_a_view_is_not_rewritten():
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    graph = g.output(g.call(operator.add, g.method("detach", x), g.linear(x, "fc", WIDTH)))
    assert skips(graph) == [
        (
            "add",
            "the stream operand is detach() of the value the branch reads, not that value: a "
            "residual across a view, reshape or detach is not rewritten",
        )
    ]


def test_a_stream_without_a_batch_dimension_is_not_a_site():
    g = GraphBuilder()
    x = g.input("x", WIDTH)
    graph = g.output(g.call(operator.add, x, g.linear(x, "fc", WIDTH)))
    assert skips(graph) == [("add", "stream has no batch dimension (rank < 2)")]


def test_an_in_place_add_into_a_graph_input_is_not_rewritten():
    # the caller would see its tensor written
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    graph = g.output(g.call(operator.iadd, x, g.linear(x, "fc", WIDTH)))
    assert skips(graph) == [("iadd", "in-place add mutates a graph input or a view")]


def test_normalize_inplace_points_later_readers_of_the_written_tensor_at_the_write():
    # h = embed(x); hidden = h (read after the write, as a list of hidden states does);
    # h += fc(h): Dynamo leaves `hidden` reading h, which at run time is the written tensor
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    h = g.linear(x, "embed", WIDTH)
    write = g.call(operator.iadd, h, g.linear(h, "fc", WIDTH))
    graph = g.output(write, h)
    normalize_inplace(graph)
    assert graph.output_node().args[0] == (write, write)
    (site,) = find_sites(graph, parameter_name).sites
    assert site.node is write


# -- Attention Residuals: which chains convert ---------------------------------------------------


def pre_norm_chain(final_norm: bool) -> tuple[GraphBuilder, fx.Graph]:
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    out = block(g, block(g, x, "blocks.0"), "blocks.1")
    return g, g.output(g.layer_norm(out, "final", WIDTH) if final_norm else out)


def test_a_pre_norm_chain_with_a_final_norm_converts_to_attention_residuals():
    _, graph = pre_norm_chain(final_norm=True)
    analysis = find_sites(graph, parameter_name)
    (chain,) = analysis.chains
    norms = chain_norms(chain)
    assert isinstance(norms, Match)
    assert [[names(n.nodes) for n in norms.value.branch[s]] for s in chain.sites] == [
        [["layer_norm"]],
        [["layer_norm_1"]],
    ]
    assert [names(n.nodes) for n in norms.value.output] == [["layer_norm_2"]]
    keep_convertible(analysis)
    assert (len(analysis.chains), analysis.skipped) == (1, [])


def test_a_chain_whose_output_no_norm_reads_stays_a_plain_residual():
    _, graph = pre_norm_chain(final_norm=False)
    analysis = find_sites(graph, parameter_name)
    keep_convertible(analysis)
    assert analysis.chains == []
    reason = (
        "not converted to Attention Residuals: the chain's output is read by the graph's "
        "return (a graph break, or a returned hidden state), not a LayerNorm/RMSNorm over the "
        "channels: the final depth attention, a mean of the values at init, would change what "
        "it reads"
    )
    assert [(s.node.name, s.reason) for s in analysis.skipped] == [
        ("add", reason),
        ("add_1", reason),
    ]


def test_a_post_norm_chain_does_not_convert_to_attention_residuals():
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    first = g.layer_norm(g.call(operator.add, x, g.linear(x, "f", WIDTH)), "ln1", WIDTH)
    out = g.call(operator.add, first, g.linear(first, "g", WIDTH))
    (chain,) = find_sites(g.output(g.layer_norm(out, "final", WIDTH)), parameter_name).chains
    assert chain_norms(chain) == Skip(
        "the stream passes through layer_norm between sites (a post-norm or post-activation "
        "block): Attention Residuals need a pre-norm chain"
    )


# -- plan: the sites of all graphs ---------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, WIDTH)


class Blocks(nn.Module):
    """The parameters the hand-built graphs name (`plan` names sites after their modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))


def captured(graph: fx.Graph, index: int, inputs_from=None, graph_break=None) -> CapturedGraph:
    gm = fx.GraphModule(nn.Module(), graph)
    return CapturedGraph(gm, index, graph_break, inputs_from or {})


def graphs_split_after_block_0(post_norm_in_block_1: bool = False) -> list[CapturedGraph]:
    """blocks.0 | graph break | blocks.1, blocks.2 (blocks.1 optionally followed by a
    LayerNorm on the stream: a post-norm, which the chain lifts)."""
    first = GraphBuilder()
    x = first.input("x", 2, 3, WIDTH)
    graph_0 = first.output(block(first, x, "blocks.0"))
    second = GraphBuilder()
    y = second.input("y", 2, 3, WIDTH)
    mid = block(second, y, "blocks.1")
    if post_norm_in_block_1:
        mid = second.call(F.layer_norm, mid, (WIDTH,))
    graph_1 = second.output(block(second, mid, "blocks.2"))
    # the second graph's input 0 is what the first returned at output 0
    return [
        captured(graph_0, 0, graph_break="a print"),
        captured(graph_1, 1, inputs_from={0: (0, 0)}),
    ]


def test_plan_names_sites_after_their_blocks_and_continues_a_chain_across_a_graph_break():
    found = plan(Blocks(), graphs_split_after_block_0())
    assert [(p.key, p.name, p.anchor, p.chain_position, p.follows) for p in found.planned] == [
        ("blocks_0", "blocks.0", "blocks.0.fc.weight", 0, None),
        ("blocks_1", "blocks.1", "blocks.1.fc.weight", 1, "blocks_0"),
        ("blocks_2", "blocks.2", "blocks.2.fc.weight", 2, "blocks_1"),
    ]
    assert found.runs == 3
    report = found.report
    assert (report.graphs, report.graph_breaks) == (2, ["a print"])
    assert [(r.name, r.status, r.reason, r.graph, r.node) for r in report.rows] == [
        ("blocks.0", "rewritten", "", 0, "add"),
        (
            "blocks.1",
            "rewritten",
            "continues the chain of blocks.0 across a graph break (its n streams are handed over)",
            1,
            "add",
        ),
        ("blocks.2", "rewritten", "", 1, "add_1"),
    ]


def test_plan_keeps_the_streams_copies_before_a_post_norm_in_a_later_graph():
    # mean_i LN(X_i) != LN(mean_i X_i): every site of a chain that lifts a LayerNorm, in the
    # graphs before too, must start with its streams copies
    plain = plan(Blocks(), graphs_split_after_block_0())
    assert [p.keep_copies for p in plain.planned] == [False, False, False]
    post_norm = plan(Blocks(), graphs_split_after_block_0(post_norm_in_block_1=True))
    assert [p.keep_copies for p in post_norm.planned] == [True, True, True]


def test_plan_lists_skipped_adds_among_the_sites_in_graph_order():
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    noise = g.call(operator.add, x, g.method("relu", x))
    graph = g.output(block(g, noise, "blocks.0"))
    report = plan(Blocks(), [captured(graph, 0)]).report
    assert [(r.name, r.status) for r in report.rows] == [
        ("add", "skipped"),
        ("blocks.0", "rewritten"),
    ]
    assert str(report).splitlines()[-1] == "1 rewritten, 1 skipped, 1 graph(s), 0 graph break(s)"


def test_plan_with_a_familys_narrowing_plans_only_the_chains_it_keeps():
    # Attention Residuals' narrowing: a chain that ends in a final norm is kept, and its
    # last site holds the output query; a chain whose output is returned is reported
    _, kept = pre_norm_chain(final_norm=True)
    found = plan(Blocks(), [captured(kept, 0)], narrow=keep_convertible)
    assert [(p.name, p.ends_chain) for p in found.planned] == [
        ("blocks.0", False),
        ("blocks.1", True),
    ]
    _, left_out = pre_norm_chain(final_norm=False)
    found = plan(Blocks(), [captured(left_out, 0)], narrow=keep_convertible)
    assert found.planned == []
    assert [(r.name, r.status) for r in found.report.rows] == [
        ("add", "skipped"),
        ("add_1", "skipped"),
    ]
    assert all(
        r.reason.startswith("not converted to Attention Residuals: ") for r in found.report.rows
    )


def test_plan_of_a_graph_without_adds_has_no_sites():
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    found = plan(Blocks(), [captured(g.output(g.linear(x, "blocks.0.fc", WIDTH)), 0)])
    assert (found.planned, found.report.rows, found.runs) == ([], [], 0)


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)


class Named(nn.Module):
    """Parameters at the places `site_name` tells apart."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))
        self.gates = nn.ParameterList(nn.Parameter(torch.ones(WIDTH)) for _ in range(2))
        self.scale = nn.Parameter(torch.ones(WIDTH))


@pytest.mark.parametrize(
    ("anchor", "name"),
    [
        ("inner.a.weight", "inner"),  # a leaf's parent: the block that holds the branch
        ("layers.0.weight", "layers.0"),  # unless the parent is a list of layers
        ("gates.0", "gates.0"),  # a list of per-layer parameters: the parameter itself
        ("scale", "scale"),  # a parameter of the root
    ],
)
def test_a_site_is_named_after_the_module_its_anchor_belongs_to(anchor, name):
    assert site_name(Named(), anchor) == name


def test_sites_that_would_share_a_name_are_told_apart():
    model = Named()
    # two residuals in one module: by the layer that holds each anchor
    assert site_names(model, ["inner.a.weight", "inner.b.weight"]) == {
        "inner.a.weight": "inner.a",
        "inner.b.weight": "inner.b",
    }
    # a weight-shared layer's second call (keyed on its bias): by a call count
    assert site_names(model, ["layers.0.weight", "layers.0.bias"]) == {
        "layers.0.weight": "layers.0",
        "layers.0.bias": "layers.0#2",
    }
