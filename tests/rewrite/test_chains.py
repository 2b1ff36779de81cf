"""The hyper-connections rewrite (`hcpass.rewrite.chains`) on hand-built FX graphs, without
Dynamo: the graph each chain becomes (the recipe in the module's docstring, step by step),
the placeholders it gains, and what it hands across a graph break.

Graphs are written as Dynamo hands them to a backend (`tests.graphs.GraphBuilder`), widths
4, two streams; the manifold spec (a long string) reads SPEC in the expected code."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from expecttest import TestCase
from torch import fx

from hcpass.frontend.capture import parameter_name
from hcpass.frontend.sites import SiteAnalysis, find_sites
from hcpass.manifolds import create
from hcpass.rewrite.base import MixerSlot, RewriteResult
from hcpass.rewrite.chains import rewrite_chains
from hcpass.runtime.mixer import Mixer
from tests.graphs import GraphBuilder, code, op_counts

WIDTH = 4
DYNAMIC = create("sinkhorn", streams=2)  # coefficients from a projection of the streams
STATIC = create("sinkhorn", streams=2, dynamic=False)  # coefficients from the bias alone


def block(g: GraphBuilder, x: fx.Node, name: str) -> fx.Node:
    """A pre-norm block's add: ``x + fc(ln(x))``."""
    branch = g.linear(g.layer_norm(x, f"{name}.ln", WIDTH), f"{name}.fc", WIDTH)
    return g.call(operator.add, x, branch)


def rewrite(graph: fx.Graph, manifold=DYNAMIC) -> tuple[SiteAnalysis, RewriteResult]:
    """Find the sites and rewrite them in place, each site's mixer keyed ``site<i>``."""
    analysis = find_sites(graph, parameter_name)
    parameters = ("phi", "alpha", "bias") if manifold.dynamic else ("bias",)
    slots = {
        site: MixerSlot(f"site{i}", manifold.spec(), parameters, manifold.streams)
        for i, site in enumerate(analysis.sites)
    }
    return analysis, rewrite_chains(graph, analysis, slots)


def graph_module(graph: fx.Graph) -> fx.GraphModule:
    return fx.GraphModule(torch.nn.Module(), graph)


def placeholders(graph: fx.Graph) -> list[str]:
    return [n.name for n in graph.nodes if n.op == "placeholder"]


class TestRewrittenChain(TestCase):
    def test_a_block_reads_pre_of_the_streams_and_its_add_becomes_post_res(self):
        # embed -> one pre-norm block -> final norm: the chain starts inside the graph
        g = GraphBuilder()
        x = g.input("x", 2, 3, WIDTH)
        stream = block(g, g.linear(x, "embed", WIDTH), "blocks.0")
        graph = g.output(g.layer_norm(stream, "final", WIDTH))
        _, result = rewrite(graph)
        self.assertExpectedInline(
            code(graph),
            """\
linear = torch.nn.functional.linear(x, embed_weight, embed_bias)
unsqueeze = linear.unsqueeze(0)
expand = unsqueeze.expand(2, -1, -1, -1)
coeffs_default = torch.ops.hcpass.coeffs.default(expand, site0_phi, site0_alpha, site0_bias, SPEC)
getitem = coeffs_default[0]
getitem_1 = coeffs_default[1]
getitem_2 = coeffs_default[2]
pre_default = torch.ops.hcpass.pre.default(expand, getitem)
layer_norm = torch.nn.functional.layer_norm(pre_default, (4,), blocks_0_ln_weight, blocks_0_ln_bias, 1e-05)
linear_1 = torch.nn.functional.linear(layer_norm, blocks_0_fc_weight, blocks_0_fc_bias)
post_res_default = torch.ops.hcpass.post_res.default(expand, linear_1, getitem_1, getitem_2)
mean = post_res_default.mean(0)
layer_norm_1 = torch.nn.functional.layer_norm(mean, (4,), final_weight, final_bias, 1e-05)
return (layer_norm_1,)""",
        )
        # the mixer's parameters follow the graph's own inputs, in the slot's order
        assert placeholders(graph)[-3:] == ["site0_phi", "site0_alpha", "site0_bias"]
        (inputs,) = result.mixer_inputs
        assert inputs.anchor.name == "blocks_0_fc_weight" and inputs.channels == WIDTH
        assert (result.site_count, result.stream_inputs, result.stream_outputs) == (1, [], [])

    def test_a_static_manifold_passes_no_projection_to_coeffs(self):
        g = GraphBuilder()
        x = g.input("x", 2, 3, WIDTH)
        graph = g.output(g.method("sum", block(g, g.linear(x, "embed", WIDTH), "blocks.0")))
        rewrite(graph, STATIC)
        (coeffs,) = [n for n in graph.nodes if n.target is torch.ops.hcpass.coeffs.default]
        assert [getattr(a, "name", a) for a in coeffs.args[:4]] == [
            "expand",
            None,
            None,
            "site0_bias",
        ]

    def test_blocks_in_sequence_pass_the_streams_on_and_collapse_once(self):
        g = GraphBuilder()
        x = g.input("x", 2, 3, WIDTH)
        stream = g.linear(x, "embed", WIDTH)
        for i in range(3):
            stream = block(g, stream, f"blocks.{i}")
        graph = g.output(g.method("sum", stream))
        rewrite(graph)
        assert op_counts(graph_module(graph)) == {
            "unsqueeze": 1,
            "expand": 1,
            "coeffs": 3,
            "pre": 3,
            "post_res": 3,
            "mean": 1,
            "sum": 1,
        }
        merges = [n for n in graph.nodes if n.target is torch.ops.hcpass.post_res.default]
        # each site's coefficients are computed from the previous site's streams
        coeffs = [n for n in graph.nodes if n.target is torch.ops.hcpass.coeffs.default]
        assert [c.args[0] for c in coeffs[1:]] == merges[:-1]

    def test_a_lifted_post_norm_runs_on_the_streams_folded_into_the_batch(self):
        # x = ln(x + f(x)); x + g(x): ln runs once on the (2 * batch) folded streams
        g = GraphBuilder()
        x = g.input("x", 2, 3, WIDTH)
        stream = g.linear(x, "embed", WIDTH)
        normed = g.call(
            torch.nn.functional.layer_norm,
            g.call(operator.add, stream, g.linear(stream, "f", WIDTH)),
            (WIDTH,),
        )
        out = g.call(operator.add, normed, g.linear(normed, "g", WIDTH))
        graph = g.output(g.method("sum", out))
        rewrite(graph)
        self.assertExpectedInline(
            code(graph),
            """\
linear = torch.nn.functional.linear(x, embed_weight, embed_bias)
unsqueeze = linear.unsqueeze(0)
expand = unsqueeze.expand(2, -1, -1, -1)
coeffs_default = torch.ops.hcpass.coeffs.default(expand, site0_phi, site0_alpha, site0_bias, SPEC)
getitem = coeffs_default[0]
getitem_1 = coeffs_default[1]
getitem_2 = coeffs_default[2]
pre_default = torch.ops.hcpass.pre.default(expand, getitem)
linear_1 = torch.nn.functional.linear(pre_default, f_weight, f_bias)
post_res_default = torch.ops.hcpass.post_res.default(expand, linear_1, getitem_1, getitem_2)
flatten = post_res_default.flatten(0, 1)
layer_norm_1 = torch.nn.functional.layer_norm(flatten, (4,))
unflatten = layer_norm_1.unflatten(0, (2, -1))
coeffs_default_1 = torch.ops.hcpass.coeffs.default(unflatten, site1_phi, site1_alpha, site1_bias, SPEC)
getitem_3 = coeffs_default_1[0]
getitem_4 = coeffs_default_1[1]
getitem_5 = coeffs_default_1[2]
pre_default_1 = torch.ops.hcpass.pre.default(unflatten, getitem_3)
linear_2 = torch.nn.functional.linear(pre_default_1, g_weight, g_bias)
post_res_default_1 = torch.ops.hcpass.post_res.default(unflatten, linear_2, getitem_4, getitem_5)
mean = post_res_default_1.mean(0)
sum_1 = mean.sum()
return (sum_1,)""",
        )

    def test_parallel_blocks_each_read_their_own_copy_of_the_shared_norm(self):
        # x + attn(h) + mlp(h), h = ln(x): each branch reads pre() of its own coefficients
        g = GraphBuilder()
        x = g.input("x", 2, 3, WIDTH)
        stream = g.linear(x, "embed", WIDTH)
        h = g.layer_norm(stream, "ln", WIDTH)
        first = g.call(operator.add, stream, g.linear(h, "attn", WIDTH))
        second = g.call(operator.add, first, g.linear(h, "mlp", WIDTH))
        graph = g.output(g.method("sum", second))
        rewrite(graph)
        self.assertExpectedInline(
            code(graph),
            """\
linear = torch.nn.functional.linear(x, embed_weight, embed_bias)
unsqueeze = linear.unsqueeze(0)
expand = unsqueeze.expand(2, -1, -1, -1)
coeffs_default = torch.ops.hcpass.coeffs.default(expand, site0_phi, site0_alpha, site0_bias, SPEC)
getitem = coeffs_default[0]
getitem_1 = coeffs_default[1]
getitem_2 = coeffs_default[2]
pre_default = torch.ops.hcpass.pre.default(expand, getitem)
coeffs_default_1 = torch.ops.hcpass.coeffs.default(expand, site1_phi, site1_alpha, site1_bias, SPEC)
getitem_3 = coeffs_default_1[0]
getitem_4 = coeffs_default_1[1]
getitem_5 = coeffs_default_1[2]
pre_default_1 = torch.ops.hcpass.pre.default(expand, getitem_3)
layer_norm_1 = torch.nn.functional.layer_norm(pre_default_1, (4,), ln_weight, ln_bias, 1e-05)
layer_norm = torch.nn.functional.layer_norm(pre_default, (4,), ln_weight, ln_bias, 1e-05)
linear_1 = torch.nn.functional.linear(layer_norm, attn_weight, attn_bias)
post_res_default = torch.ops.hcpass.post_res.default(expand, linear_1, getitem_1, getitem_2)
linear_2 = torch.nn.functional.linear(layer_norm_1, mlp_weight, mlp_bias)
post_res_default_1 = torch.ops.hcpass.post_res.default(post_res_default, linear_2, getitem_4, getitem_5)
mean = post_res_default_1.mean(0)
sum_1 = mean.sum()
return (sum_1,)""",
        )

    def test_a_hidden_state_read_mid_chain_reads_the_mean_of_the_streams(self):
        # HF's output_hidden_states: the chain goes on, the reader gets one stream's worth
        g = GraphBuilder()
        x = g.input("x", 2, 3, WIDTH)
        hidden = block(g, g.linear(x, "embed", WIDTH), "blocks.0")
        out = block(g, hidden, "blocks.1")
        graph = g.output(g.method("sum", out), g.method("sum", hidden))
        rewrite(graph)
        merges = [n for n in graph.nodes if n.target is torch.ops.hcpass.post_res.default]
        means = [n for n in graph.nodes if n.target == "mean"]
        assert [m.args for m in means] == [(merges[0], 0), (merges[1], 0)]
        sums = graph.output_node().args[0]
        assert [s.args[0] for s in sums] == [means[1], means[0]]

    def test_an_alpha_scales_the_branch_output_before_the_merge(self):
        g = GraphBuilder()
        x = g.input("x", 2, 3, WIDTH)
        stream = g.linear(x, "embed", WIDTH)
        out = g.call(torch.add, stream, g.linear(stream, "fc", WIDTH), alpha=0.5)
        graph = g.output(g.method("sum", out))
        rewrite(graph)
        (merge,) = [n for n in graph.nodes if n.target is torch.ops.hcpass.post_res.default]
        scaled = merge.args[1]
        assert (scaled.target, scaled.args[1], scaled.args[0].name) == (
            operator.mul,
            0.5,
            "linear_1",
        )


# -- across graph breaks (hcpass.runtime.handoff) ------------------------------------------------


def test_a_chain_from_a_graph_input_takes_its_streams_and_returns_the_last_ones():
    # the graph between two breaks: its input is a stream, its output the stream after it
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    out = block(g, x, "blocks.0")
    graph = g.output(out)
    analysis, result = rewrite(graph)
    (site,) = analysis.sites
    # the n-stream state comes in after the mixer's parameters, and goes out after the outputs
    assert placeholders(graph)[-4:] == ["site0_phi", "site0_alpha", "site0_bias", "x_streams"]
    ((stream, state, first),) = result.stream_inputs
    assert (stream, state.name, first) == (x, "x_streams", site)
    assert result.stream_outputs == [(0, site)]
    (merge,) = [n for n in graph.nodes if n.target is torch.ops.hcpass.post_res.default]
    assert merge.args[0] is state
    collapsed, returned_state = graph.output_node().args[0]
    assert (collapsed.target, collapsed.args, returned_state) == ("mean", (merge, 0), merge)


def test_a_chain_of_sites_with_different_stream_counts_is_refused():
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    graph = g.output(block(g, block(g, g.linear(x, "embed", WIDTH), "a"), "b"))
    analysis = find_sites(graph, parameter_name)
    slots = {
        site: MixerSlot(f"site{i}", "spec", ("bias",), streams)
        for i, (site, streams) in enumerate(zip(analysis.sites, (2, 4), strict=True))
    }
    with pytest.raises(ValueError, match=r"one chain mixes stream counts \[2, 4\]"):
        rewrite_chains(graph, analysis, slots)


def test_sites_share_a_slot_share_its_placeholders():
    # a weight-shared block's two calls, planned onto one mixer, take its parameters once
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    graph = g.output(block(g, block(g, g.linear(x, "embed", WIDTH), "a"), "b"))
    analysis = find_sites(graph, parameter_name)
    slot = MixerSlot("shared", STATIC.spec(), ("bias",), 2)
    result = rewrite_chains(graph, analysis, dict.fromkeys(analysis.sites, slot))
    assert placeholders(graph).count("shared_bias") == 1
    assert (len(result.mixer_inputs), result.site_count) == (1, 2)


# -- the rewritten graph, run --------------------------------------------------------------------


@pytest.mark.parametrize("manifold", ["sinkhorn", "hc", "kronecker", "permutation", "stiefel"])
def test_the_rewritten_graph_computes_the_original_with_mixers_at_their_init(manifold):
    # the function-preserving init (`Manifold.init_bias`) makes the streams' mean the
    # original stream at every site; fp32, rounding of the mixes only (measured <= 1e-6)
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    stream = g.linear(x, "embed", WIDTH)
    for i in range(3):
        stream = block(g, stream, f"blocks.{i}")
    graph = g.output(g.layer_norm(stream, "final", WIDTH))
    inputs = [n.meta["example_value"] for n in graph.nodes if n.op == "placeholder"]
    want = graph_module(graph)(*inputs)

    rewritten = copy.deepcopy(graph)
    mixed = create(manifold, streams=4)
    analysis = find_sites(rewritten, parameter_name)
    mixers = {site: Mixer(mixed, WIDTH, chain_position=i) for i, site in enumerate(analysis.sites)}
    slots = {
        site: MixerSlot(f"site{i}", mixed.spec(), mixer.graph_parameters, mixed.streams)
        for i, (site, mixer) in enumerate(mixers.items())
    }
    rewrite_chains(rewritten, analysis, slots)
    parameters = [getattr(m, name) for m in mixers.values() for name in m.graph_parameters]
    got = graph_module(rewritten)(*inputs, *parameters)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
