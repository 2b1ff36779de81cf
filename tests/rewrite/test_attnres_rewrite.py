"""The Attention Residuals rewrite (`hcpass.rewrite.attnres`) on hand-built FX graphs, without
Dynamo: which values each depth attention reads (full and block AttnRes), the norms'
epsilon divided by k^2 for k values, and each attention recomputed in the backward with the
norm that reads it (an activation-checkpoint region of its own).

Graphs are written as Dynamo hands them to a backend (`tests.graphs.GraphBuilder`): an
embedding, pre-norm blocks ``x + fc(ln(x))`` of width 4 and a final LayerNorm (eps 1e-5)."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from expecttest import TestCase
from torch import fx

from hcpass.frontend.capture import parameter_name
from hcpass.frontend.sites import find_sites
from hcpass.rewrite.attnres import AttnResOptions, rewrite_attnres
from hcpass.rewrite.base import MixerSlot, RewriteResult, graph_module
from hcpass.runtime.pseudo_query import PseudoQuery
from tests.graphs import GraphBuilder, body

WIDTH = 4


def pre_norm_stack(blocks: int, final_norm: bool = True) -> fx.Graph:
    g = GraphBuilder()
    x = g.input("x", 2, 3, WIDTH)
    stream = g.linear(x, "embed", WIDTH)
    for i in range(blocks):
        branch = g.linear(g.layer_norm(stream, f"b{i}.ln", WIDTH), f"b{i}.fc", WIDTH)
        stream = g.call(operator.add, stream, branch)
    return g.output(g.layer_norm(stream, "final", WIDTH) if final_norm else stream)


def rewrite(graph: fx.Graph, options: AttnResOptions) -> RewriteResult:
    """Find the sites and rewrite them in place; site i's pseudo-query module is ``site<i>``
    (the first site has no query, the last also holds the output query)."""
    analysis = find_sites(graph, parameter_name)
    sites = analysis.sites
    slots = {}
    for i, site in enumerate(sites):
        parameters = ("query",) * (i > 0) + ("output_query",) * (i == len(sites) - 1)
        slots[site] = MixerSlot(f"site{i}", options.spec(), parameters)
    return rewrite_attnres(graph, analysis, slots, options)


def depth_attentions(result: RewriteResult) -> list[tuple[list[str], str, float]]:
    """Per depth attention, in graph order: the values it reads, its query and the epsilon
    of the norm that reads it (each sits in a checkpoint body of its own)."""
    found = []
    for region in result.bodies.values():
        (attend,) = [n for n in region.graph.nodes if n.target is torch.ops.hcpass.attnres.default]
        values, query, _ = attend.args
        (norm,) = attend.users
        found.append(([v.name for v in values], query.name, norm.args[-1]))
    return found


class TestRewrittenAttnRes(TestCase):
    def test_full_attnres_of_two_blocks(self):
        graph = pre_norm_stack(blocks=2)
        result = rewrite(graph, AttnResOptions())
        # the first block reads x_0 itself; the second and the final norm read the depth
        # attention over x_0 and the branch outputs, in checkpoint regions of their own; the
        # original adds are gone (nothing reads the plain sum)
        self.assertExpectedInline(
            body(graph_module(torch.nn.Module(), graph, result)),
            """\
linear = torch.nn.functional.linear(x, embed_weight, embed_bias)
layer_norm = torch.nn.functional.layer_norm(linear, (4,), b0_ln_weight, b0_ln_bias, 1e-05)
linear_1 = torch.nn.functional.linear(layer_norm, b0_fc_weight, b0_fc_bias)
hcpass_checkpoint_body_0 = self.hcpass_checkpoint_body_0
tag_activation_checkpoint = torch.ops.higher_order.tag_activation_checkpoint(hcpass_checkpoint_body_0, linear, linear_1, site1_query, b1_ln_weight, b1_ln_bias, use_reentrant = False)
getitem = tag_activation_checkpoint[0]
linear_2 = torch.nn.functional.linear(getitem, b1_fc_weight, b1_fc_bias)
hcpass_checkpoint_body_1 = self.hcpass_checkpoint_body_1
tag_activation_checkpoint_1 = torch.ops.higher_order.tag_activation_checkpoint(hcpass_checkpoint_body_1, linear, linear_1, linear_2, site1_output_query, final_weight, final_bias, use_reentrant = False)
getitem_1 = tag_activation_checkpoint_1[0]
return (getitem_1,)""",
        )
        # each region: the attention, and the norm with its epsilon divided by k^2
        self.assertExpectedInline(
            body(result.bodies["hcpass_checkpoint_body_1"]),
            """\
attnres_default_1 = torch.ops.hcpass.attnres.default([linear, linear_1, linear_2], site1_output_query, 1e-06)
layer_norm_2 = torch.nn.functional.layer_norm(attnres_default_1, (4,), final_weight, final_bias, 1.1111111111111112e-06)
return (layer_norm_2,)""",
        )
        assert depth_attentions(result) == [
            (["linear", "linear_1"], "site1_query", 1e-5 / 4),
            (["linear", "linear_1", "linear_2"], "site1_output_query", 1e-5 / 9),
        ]
        assert (result.site_count, result.stream_inputs, result.stream_outputs) == (2, [], [])

    def test_block_attnres_attends_over_completed_blocks_and_the_partial_sum(self):
        # blocks of two sites: b_0 = x_0; site 0 opens block 1 (partial P = y_0); site 1
        # adds y_1 to P; site 2 closes block 1 (add_3 = y_0 + y_1) and opens block 2 (y_2)
        graph = pre_norm_stack(blocks=3)
        result = rewrite(graph, AttnResOptions(block_size=2))
        assert depth_attentions(result) == [
            (["linear", "linear_1"], "site1_query", 1e-5 / 4),
            (["linear", "add_3"], "site2_query", 1e-5 / 4),
            (["linear", "add_3", "linear_3"], "site2_output_query", 1e-5 / 9),
        ]
        (partial,) = [n for n in graph.nodes if n.name == "add_3"]
        assert (partial.target, [a.name for a in partial.args]) == (
            operator.add,
            ["linear_1", "linear_2"],
        )

    def test_the_key_epsilon_is_the_options(self):
        graph = pre_norm_stack(blocks=2)
        result = rewrite(graph, AttnResOptions(eps=1e-3))
        for region in result.bodies.values():
            (attend,) = [
                n for n in region.graph.nodes if n.target is torch.ops.hcpass.attnres.default
            ]
            assert attend.args[-1] == 1e-3


def test_a_chain_the_front_end_would_have_skipped_is_refused():
    graph = pre_norm_stack(blocks=2, final_norm=False)
    with pytest.raises(ValueError, match="cannot rewrite this chain to Attention Residuals: "):
        rewrite(graph, AttnResOptions())


@pytest.mark.parametrize("block_size", [None, 2])
def test_the_rewritten_graph_computes_the_original_with_queries_at_their_init(block_size):
    # zero queries: every depth attention is the mean of its k values, x / k for the plain
    # sum x, which the scale-invariant norms (eps / k^2) read as they read x; fp32, measured
    # <= 1e-6 (without the eps division: 2e-4)
    graph = pre_norm_stack(blocks=4)
    inputs = [n.meta["example_value"] for n in graph.nodes if n.op == "placeholder"]
    want = fx.GraphModule(torch.nn.Module(), graph)(*inputs)

    rewritten = copy.deepcopy(graph)
    options = AttnResOptions(block_size=block_size)
    analysis = find_sites(rewritten, parameter_name)
    sites = analysis.sites
    queries = {
        site: PseudoQuery(
            WIDTH, options.spec(), starts_chain=i == 0, ends_chain=i == len(sites) - 1
        )
        for i, site in enumerate(sites)
    }
    slots = {
        site: MixerSlot(f"site{i}", options.spec(), query.graph_parameters)
        for i, (site, query) in enumerate(queries.items())
    }
    result = rewrite_attnres(rewritten, analysis, slots, options)
    parameters = [getattr(q, name) for q in queries.values() for name in q.graph_parameters]
    got = graph_module(torch.nn.Module(), rewritten, result)(*inputs, *parameters)
    (got,), (want,) = got, want
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
