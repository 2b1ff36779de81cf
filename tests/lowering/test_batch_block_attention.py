"""The CUDA lowering's batching of Block Attention Residuals
(`hcpass.lowering.passes.batch_block_attention`): which depth attentions share one phase 1
(``hcpass::attnres_blocks``), how their checkpoint regions take its outputs, what is left
alone and why, and that the lowered graph computes the same values and gradients (on CPU
the phase ops run their references; tests/lowering/test_cuda_path.py runs the kernels).
"""

from __future__ import annotations

import operator
from unittest import mock

import pytest
import torch
from expecttest import TestCase
from torch import fx
from torch._dynamo.utils import counters

import hcpass
import hcpass.lowering.backend as backend
from hcpass.frontend.regions import REGION, Region
from hcpass.lowering.passes.batch_block_attention import BatchBlockAttention
from hcpass.rewrite.regions import checkpoint_eagerly, outline_checkpoints
from tests import models
from tests.graphs import GraphBuilder, body, code

OPS = torch.ops.hcpass
EPS = 1e-6


def two_sites(
    regions: bool = False, one_region: bool = False, late_query: bool = False, eps2: float = EPS
) -> fx.GraphModule:
    """Two depth attentions over the same completed block x, each with its partial block,
    as the Block AttnRes rewrite writes them; `regions`: each in a checkpoint region of its
    own; `one_region`: both in one (a checkpointed transformer block); `late_query`: the
    second query computed after the first attention."""
    g = GraphBuilder()
    x = g.input("x", 5, 12)
    w1, w2 = g.parameter("w1", 12), g.parameter("w2", 12)
    y = g.call(torch.tanh, x)
    h1 = g.call(OPS.attnres.default, [x, y], w1, EPS)
    z = g.call(operator.add, y, h1)
    if late_query:
        w2 = g.call(operator.mul, w2, 2.0)
    h2 = g.call(OPS.attnres.default, [x, z], w2, eps2)
    graph = g.output(h2)
    root = torch.nn.Module()
    if regions:
        for index, node in enumerate((h1, h2)):
            node.meta[REGION] = Region(index, {"use_reentrant": False})
    if one_region:
        region = Region(0, {"use_reentrant": False})
        for node in (y, h1, z, h2):
            node.meta[REGION] = region
    if regions or one_region:
        for name, module in outline_checkpoints(graph).items():
            setattr(root, name, module)
    return fx.GraphModule(root, graph)


def lowered(gm: fx.GraphModule) -> fx.GraphModule:
    counters.clear()
    BatchBlockAttention()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm


def bodies(gm: fx.GraphModule) -> str:
    """Each checkpoint body's signature and code, in the order the graph reads them."""
    parts = []
    for node in gm.graph.find_nodes(op="get_attr"):
        module = getattr(gm, node.target)
        inputs = ", ".join(n.name for n in module.graph.find_nodes(op="placeholder"))
        parts.append(f"{node.target}({inputs}):\n{body(module)}")
    return "\n".join(parts)


class TestWhichAttentionsShareAPhaseOne(TestCase):
    def test_two_attentions_over_one_block_share_one_phase_one(self):
        gm = lowered(two_sites())
        self.assertEqual(dict(counters["hcpass"]), {"attnres_batched": 1})
        self.assertExpectedInline(
            body(gm),
            """\
stack = torch.stack([w1, w2])
attnres_blocks_default = torch.ops.hcpass.attnres_blocks.default([x], stack, 1e-06)
getitem = attnres_blocks_default[0]
getitem_1 = attnres_blocks_default[1]
tanh = torch.tanh(x)
select = torch.select(getitem, 0, 0)
select_1 = torch.select(getitem_1, 0, 0)
attnres_merge_default = torch.ops.hcpass.attnres_merge.default(select, select_1, tanh, w1, 1e-06)
add = tanh + attnres_merge_default
select_2 = torch.select(getitem, 0, 1)
select_3 = torch.select(getitem_1, 0, 1)
attnres_merge_default_1 = torch.ops.hcpass.attnres_merge.default(select_2, select_3, add, w2, 1e-06)
return (attnres_merge_default_1,)""",
        )

    def test_checkpoint_regions_take_their_query_s_phase_one_outputs(self):
        """Phase 1 runs outside the regions; each region's call passes its o[s] and lse[s]
        in, and no longer the block it read only for the attention."""
        gm = lowered(two_sites(regions=True))
        self.assertEqual(dict(counters["hcpass"]), {"attnres_batched": 1})
        self.assertExpectedInline(
            body(gm),
            """\
stack = torch.stack([w1, w2])
attnres_blocks_default = torch.ops.hcpass.attnres_blocks.default([x], stack, 1e-06)
getitem_2 = attnres_blocks_default[0]
getitem_3 = attnres_blocks_default[1]
tanh = torch.tanh(x)
hcpass_checkpoint_body_0 = self.hcpass_checkpoint_body_0
select = torch.select(getitem_2, 0, 0)
select_1 = torch.select(getitem_3, 0, 0)
tag_activation_checkpoint = torch.ops.higher_order.tag_activation_checkpoint(hcpass_checkpoint_body_0, tanh, w1, select, select_1, use_reentrant = False)
getitem = tag_activation_checkpoint[0]
add = tanh + getitem
hcpass_checkpoint_body_1 = self.hcpass_checkpoint_body_1
select_2 = torch.select(getitem_2, 0, 1)
select_3 = torch.select(getitem_3, 0, 1)
tag_activation_checkpoint_1 = torch.ops.higher_order.tag_activation_checkpoint(hcpass_checkpoint_body_1, add, w2, select_2, select_3, use_reentrant = False)
getitem_1 = tag_activation_checkpoint_1[0]
return (getitem_1,)""",
        )
        self.assertExpectedInline(
            bodies(gm),
            """\
hcpass_checkpoint_body_0(tanh, w1, attnres_default_o, attnres_default_lse):
attnres_merge_default = torch.ops.hcpass.attnres_merge.default(attnres_default_o, attnres_default_lse, tanh, w1, 1e-06)
return (attnres_merge_default,)
hcpass_checkpoint_body_1(add, w2, attnres_default_1_o, attnres_default_1_lse):
attnres_merge_default = torch.ops.hcpass.attnres_merge.default(attnres_default_1_o, attnres_default_1_lse, add, w2, 1e-06)
return (attnres_merge_default,)""",
        )

    def test_two_attentions_in_one_region_both_take_their_outputs(self):
        gm = lowered(two_sites(one_region=True))
        self.assertEqual(dict(counters["hcpass"]), {"attnres_batched": 1})
        self.assertExpectedInline(
            body(gm),
            """\
stack = torch.stack([w1, w2])
attnres_blocks_default = torch.ops.hcpass.attnres_blocks.default([x], stack, 1e-06)
getitem_1 = attnres_blocks_default[0]
getitem_2 = attnres_blocks_default[1]
hcpass_checkpoint_body_0 = self.hcpass_checkpoint_body_0
select = torch.select(getitem_1, 0, 0)
select_1 = torch.select(getitem_2, 0, 0)
select_2 = torch.select(getitem_1, 0, 1)
select_3 = torch.select(getitem_2, 0, 1)
tag_activation_checkpoint = torch.ops.higher_order.tag_activation_checkpoint(hcpass_checkpoint_body_0, x, w1, w2, select, select_1, select_2, select_3, use_reentrant = False)
getitem = tag_activation_checkpoint[0]
return (getitem,)""",
        )
        self.assertExpectedInline(
            bodies(gm),
            """\
hcpass_checkpoint_body_0(x, w1, w2, attnres_default_o, attnres_default_lse, attnres_default_1_o, attnres_default_1_lse):
tanh = torch.tanh(x)
attnres_merge_default = torch.ops.hcpass.attnres_merge.default(attnres_default_o, attnres_default_lse, tanh, w1, 1e-06)
add = tanh + attnres_merge_default
attnres_merge_default_1 = torch.ops.hcpass.attnres_merge.default(attnres_default_1_o, attnres_default_1_lse, add, w2, 1e-06)
return (attnres_merge_default_1,)""",
        )

    def test_another_eps_is_another_group(self):
        gm = lowered(two_sites(eps2=1e-5))
        self.assertEqual(dict(counters["hcpass"]), {})
        self.assertNotIn("attnres_blocks", code(gm.graph))

    def test_a_query_computed_after_the_first_attention_leaves_the_group_and_says_why(self):
        before = code(two_sites(late_query=True).graph)
        with self.assertLogs("hcpass", level="INFO") as logs:
            gm = lowered(two_sites(late_query=True))
        self.assertEqual(dict(counters["hcpass"]), {"attnres_unbatched": 1})
        self.assertEqual(code(gm.graph), before)
        self.assertExpectedInline(
            logs.output[-1].split(":", 2)[-1],
            """\
hcpass: batched phase 1 of 0 of 1 Attention Residuals blocks
  not batched over ['x']: a query is computed after attnres_default, the first call that reads the blocks""",
        )

    def test_a_block_computed_inside_the_region_leaves_the_group_and_says_why(self):
        g = GraphBuilder()
        x = g.input("x", 5, 12)
        w1, w2 = g.parameter("w1", 12), g.parameter("w2", 12)
        block = g.call(torch.tanh, x)
        partial = g.call(torch.sin, x)
        h1 = g.call(OPS.attnres.default, [x, block, partial], w1, EPS)
        h2 = g.call(OPS.attnres.default, [x, block, h1], w2, EPS)
        graph = g.output(h2)
        region = Region(0, {"use_reentrant": False})
        for node in (block, partial, h1, h2):
            node.meta[REGION] = region
        root = torch.nn.Module()
        for name, module in outline_checkpoints(graph).items():
            setattr(root, name, module)
        gm = fx.GraphModule(root, graph)
        before = bodies(gm)
        with self.assertLogs("hcpass", level="INFO") as logs:
            lowered(gm)
        self.assertEqual(dict(counters["hcpass"]), {"attnres_unbatched": 1})
        self.assertEqual(bodies(gm), before)
        self.assertIn(
            "not batched over ['x', 'tanh']: attnres_default reads a block or its query "
            "computed inside its region",
            logs.output[-1],
        )


def _values_and_gradients(fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    (out,) = fn(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return [out, *torch.autograd.grad(out, leaves, grad)]


@pytest.mark.parametrize("regions", ["none", "one each", "one for both"])
def test_the_batched_graph_computes_the_same_values_and_gradients(regions):
    """Checkpoint bodies run through torch.utils.checkpoint, as the eager runtime does."""

    def build(batch: bool) -> fx.GraphModule:
        gm = two_sites(regions=regions == "one each", one_region=regions == "one for both")
        if batch:
            BatchBlockAttention()(gm.graph)
            assert any(n.target is OPS.attnres_blocks.default for n in gm.graph.nodes)
        checkpoint_eagerly(gm.graph)
        gm.recompile()
        return gm

    gm = build(batch=False)
    inputs = [n.meta["example_value"] for n in gm.graph.find_nodes(op="placeholder")]
    want = _values_and_gradients(gm, inputs)
    batched = build(batch=True)
    got = _values_and_gradients(batched, inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_compiled_block_attnres_model_batches_every_block():
    """A converted 2-layer GPT with blocks of 2 sites, compiled by backend="hcpass" lowering
    as for CUDA (the phase ops run their references here): both blocks batched, output and
    every gradient as the eager converted model."""
    from torch._dynamo.backends.debugging import aot_eager_decomp_partition

    torch.manual_seed(0)
    (ids,), _ = models.token_inputs(1, 7)
    model = models.tiny_gpt(width=32, layers=2)
    converted = hcpass.convert(model, (ids,), family="attnres", block_size=2)
    with torch.no_grad():
        for p in converted.mixers.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    params = [p for p in converted.parameters() if p.requires_grad]

    def run(fn):
        out = models.logits(fn(ids))
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return [out, *torch.autograd.grad((out * weights).sum(), params)]

    want = run(converted)
    torch._dynamo.reset()
    counters.clear()

    def graphs_run_as_fx(gm, example_inputs, passes):
        return aot_eager_decomp_partition(gm, example_inputs)

    with (
        mock.patch.object(backend, "_on_cuda", lambda example_inputs: True),
        mock.patch.object(backend, "_compile_fx", graphs_run_as_fx),
    ):
        got = run(torch.compile(converted, backend="hcpass"))
    assert counters["hcpass"]["attnres_batched"] == 2
    assert counters["hcpass"]["attnres_unbatched"] == 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
