"""The rewritten graph, as users see it in `converted.graph_module.code`."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from expecttest import TestCase
from torch import nn
from torch.utils.checkpoint import checkpoint

import hcpass
from tests import models
from tests.graphs import body, op_counts


class OneBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.mlp = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class Fp32Residual(nn.Module):
    """Mamba's ``residual_in_fp32``: the residual is a cast of the value the branch reads."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.mlp = nn.Linear(4, 4)

    def forward(self, x):
        residual = x.to(torch.float32)
        return residual + self.mlp(self.ln(x))


class CheckpointedBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(OneBlock() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x


class TestRewrittenGraph(TestCase):
    def test_one_block(self):
        x = torch.randn(2, 3, 4)
        converted = hcpass.convert(OneBlock(), (x,), streams=2)
        self.assertExpectedInline(
            body(converted.graph_module),
            """\
coeffs_default = torch.ops.hcpass.coeffs.default(args_0_streams, mlp_phi, mlp_alpha, mlp_bias, SPEC)
getitem = coeffs_default[0]
getitem_1 = coeffs_default[1]
getitem_2 = coeffs_default[2]
pre_default = torch.ops.hcpass.pre.default(args_0_streams, getitem)
layer_norm = torch.nn.functional.layer_norm(pre_default, (4,), ln.weight, ln.bias, 1e-05)
linear = torch.nn.functional.linear(layer_norm, mlp.weight, mlp.bias)
post_res_default = torch.ops.hcpass.post_res.default(args_0_streams, linear, getitem_1, getitem_2)
mean = post_res_default.mean(0)
return (mean, post_res_default)""",
        )

    def test_post_norm_is_applied_per_stream(self):
        x = torch.randn(2, 3, 4)
        converted = hcpass.convert(models.PostNorm(), (x,), streams=2)
        self.assertExpectedInline(
            body(converted.graph_module),
            """\
coeffs_default = torch.ops.hcpass.coeffs.default(args_0_streams, f_phi, f_alpha, f_bias, SPEC)
getitem = coeffs_default[0]
getitem_1 = coeffs_default[1]
getitem_2 = coeffs_default[2]
pre_default = torch.ops.hcpass.pre.default(args_0_streams, getitem)
linear = torch.nn.functional.linear(pre_default, f.weight, f.bias)
post_res_default = torch.ops.hcpass.post_res.default(args_0_streams, linear, getitem_1, getitem_2)
flatten = post_res_default.flatten(0, 1)
layer_norm = torch.nn.functional.layer_norm(flatten, (4,), ln1.weight, ln1.bias, 1e-05)
unflatten = layer_norm.unflatten(0, (2, -1))
coeffs_default_1 = torch.ops.hcpass.coeffs.default(unflatten, g_phi, g_alpha, g_bias, SPEC)
getitem_3 = coeffs_default_1[0]
getitem_4 = coeffs_default_1[1]
getitem_5 = coeffs_default_1[2]
pre_default_1 = torch.ops.hcpass.pre.default(unflatten, getitem_3)
linear_1 = torch.nn.functional.linear(pre_default_1, g.weight, g.bias)
post_res_default_1 = torch.ops.hcpass.post_res.default(unflatten, linear_1, getitem_4, getitem_5)
mean = post_res_default_1.mean(0)
layer_norm_1 = torch.nn.functional.layer_norm(mean, (4,), ln2.weight, ln2.bias, 1e-05)
return (layer_norm_1,)""",
        )

    def test_side_reader_gets_the_collapsed_stream(self):
        x = torch.randn(2, 3, 4)
        converted = hcpass.convert(models.SideReader(), (x,), streams=2)
        self.assertExpectedInline(
            body(converted.graph_module),
            """\
coeffs_default = torch.ops.hcpass.coeffs.default(args_0_streams, f_phi, f_alpha, f_bias, SPEC)
getitem = coeffs_default[0]
getitem_1 = coeffs_default[1]
getitem_2 = coeffs_default[2]
pre_default = torch.ops.hcpass.pre.default(args_0_streams, getitem)
linear = torch.nn.functional.linear(pre_default, f.weight, f.bias)
post_res_default = torch.ops.hcpass.post_res.default(args_0_streams, linear, getitem_1, getitem_2)
mean = post_res_default.mean(0)
coeffs_default_1 = torch.ops.hcpass.coeffs.default(post_res_default, g_phi, g_alpha, g_bias, SPEC)
getitem_3 = coeffs_default_1[0]
getitem_4 = coeffs_default_1[1]
getitem_5 = coeffs_default_1[2]
pre_default_1 = torch.ops.hcpass.pre.default(post_res_default, getitem_3)
linear_1 = torch.nn.functional.linear(pre_default_1, g.weight, g.bias)
post_res_default_1 = torch.ops.hcpass.post_res.default(post_res_default, linear_1, getitem_4, getitem_5)
mean_1 = post_res_default_1.mean(0)
return (mean_1, mean, post_res_default_1)""",
        )
        out, hidden = converted(x)
        ref_out, ref_hidden = converted.original(x)
        torch.testing.assert_close(hidden, ref_hidden)
        torch.testing.assert_close(out, ref_out)

    def test_op_counts_gpt_like_model(self):
        from tests import models

        model = models.tiny_gpt(layers=3)
        converted = hcpass.convert(model, models.token_inputs()[0], streams=4)
        counts = op_counts(converted.graph_module)
        # 2 sites per block: one coeffs/pre/post_res each, no residual add left; the one add
        # is the token + position embedding, which starts the stream.
        self.assertEqual((counts["coeffs"], counts["pre"], counts["post_res"]), (6, 6, 6))
        self.assertEqual(counts["add"], 1)
        self.assertEqual(counts["expand"], 1)  # one chain
        self.assertEqual(counts["mean"], 1)  # collapsed once, before ln_f

    def test_parallel_block_branches_each_get_their_own_read(self):
        from tests import models

        converted = hcpass.convert(models.ParallelBlocks(), models.token_inputs()[0], streams=4)
        counts = op_counts(converted.graph_module)
        # layer 0 `x + attn(h) + mlp(h)`: two sites; layer 1 `mlp(h) + attn(h) + x`: one
        # site whose branch is the sum.
        self.assertEqual(counts["coeffs"], 3)
        # layer 0's shared norm is copied so each branch reads its own mix of the streams
        norms = [n for n in converted.graph_module.graph.nodes if n.target is F.layer_norm]
        self.assertEqual(len(norms), 3)
        reads = {n.args[0] for n in norms}
        self.assertEqual(len(reads), 3)

    def test_residual_cast_to_fp32_is_applied_per_stream(self):
        """The chain starts at the bf16 value the branch reads; the cast is a stream op and
        the bf16 branch output is cast to the add's dtype (fp32) before the merge."""
        model = Fp32Residual().to(torch.bfloat16)
        converted = hcpass.convert(model, (torch.randn(2, 3, 4, dtype=torch.bfloat16),), streams=2)
        self.assertExpectedInline(
            body(converted.graph_module),
            """\
coeffs_default = torch.ops.hcpass.coeffs.default(args_0_streams, mlp_phi, mlp_alpha, mlp_bias, SPEC)
getitem = coeffs_default[0]
getitem_1 = coeffs_default[1]
getitem_2 = coeffs_default[2]
pre_default = torch.ops.hcpass.pre.default(args_0_streams, getitem)
flatten = args_0_streams.flatten(0, 1)
to = flatten.to(torch.float32)
unflatten = to.unflatten(0, (2, -1))
layer_norm = torch.nn.functional.layer_norm(pre_default, (4,), ln.weight, ln.bias, 1e-05)
linear = torch.nn.functional.linear(layer_norm, mlp.weight, mlp.bias)
to_1 = linear.to(torch.float32)
post_res_default = torch.ops.hcpass.post_res.default(unflatten, to_1, getitem_1, getitem_2)
mean = post_res_default.mean(0)
return (mean, post_res_default)""",
        )

    def test_checkpoint_regions_carry_the_streams_and_the_mixers(self):
        """Each block stays one checkpoint region; it takes and returns the n-stream state
        and takes its mixer's parameters, so the mixer is recomputed in the backward."""
        converted = hcpass.convert(CheckpointedBlocks(), (torch.randn(2, 3, 4),), streams=2)
        gm = converted.graph_module
        self.assertExpectedInline(
            body(gm),
            """\
hcpass_checkpoint_body_0 = self.hcpass_checkpoint_body_0
tag_activation_checkpoint_2 = torch.ops.higher_order.tag_activation_checkpoint(hcpass_checkpoint_body_0, args_0_streams, blocks_0_phi, blocks_0_alpha, blocks_0_bias, blocks.0.ln.weight, blocks.0.ln.bias, blocks.0.mlp.weight, blocks.0.mlp.bias, use_reentrant = False)
getitem_6 = tag_activation_checkpoint_2[0]
hcpass_checkpoint_body_1 = self.hcpass_checkpoint_body_1
tag_activation_checkpoint_3 = torch.ops.higher_order.tag_activation_checkpoint(hcpass_checkpoint_body_1, getitem_6, blocks_1_phi, blocks_1_alpha, blocks_1_bias, blocks.1.ln.weight, blocks.1.ln.bias, blocks.1.mlp.weight, blocks.1.mlp.bias, use_reentrant = False)
getitem_7 = tag_activation_checkpoint_3[0]
getitem_8 = tag_activation_checkpoint_3[1]
return (getitem_8, getitem_7)""",
        )
        self.assertExpectedInline(
            body(gm.hcpass_checkpoint_body_1),
            """\
coeffs_default_1 = torch.ops.hcpass.coeffs.default(getitem_6, blocks_1_phi, blocks_1_alpha, blocks_1_bias, SPEC)
getitem_3 = coeffs_default_1[0]
getitem_4 = coeffs_default_1[1]
getitem_5 = coeffs_default_1[2]
pre_default_1 = torch.ops.hcpass.pre.default(getitem_6, getitem_3)
layer_norm_1 = torch.nn.functional.layer_norm(pre_default_1, (4,), blocks.1.ln.weight, blocks.1.ln.bias, 1e-05)
linear_1 = torch.nn.functional.linear(layer_norm_1, blocks.1.mlp.weight, blocks.1.mlp.bias)
post_res_default_1 = torch.ops.hcpass.post_res.default(getitem_6, linear_1, getitem_4, getitem_5)
mean = post_res_default_1.mean(0)
return (post_res_default_1, mean)""",
        )


class DropoutOnTheStream(nn.Module):
    """``x = drop(x + f(x))``: the dropout is lifted onto the streams between sites."""

    def __init__(self) -> None:
        super().__init__()
        self.fs = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        for f in self.fs:
            x = self.drop(x + f(x))
        return x


def test_dropout_on_the_stream_drops_every_stream_with_one_mask():
    """One mask for all n streams, drawn like the original's: in training, with the same
    seed, the converted model computes what the original does (a mask per stream would
    average n masks: the same mean, less noise)."""
    torch.manual_seed(0)
    model = DropoutOnTheStream()
    original = copy.deepcopy(model)
    x = torch.randn(4, 5, 8)
    converted = hcpass.convert(model, (x,), streams=4).train()
    assert [s.status for s in converted.report.rows] == ["rewritten"] * 3
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    out = converted(mine)
    torch.manual_seed(1)
    want = original(theirs)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-4)


class InnerChain(nn.Module):
    """Two pre-norm sites: a chain of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.f1, self.f2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, h):
        h = h + self.f1(F.gelu(self.ln1(h)))
        return h + self.f2(F.gelu(self.ln2(h)))


class ChainInsideABranch(nn.Module):
    """``x + proj(inner(ln(x)))`` with a two-site chain inside the outer site's branch."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.inner, self.proj = nn.LayerNorm(8), InnerChain(), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.proj(self.inner(self.ln(x)))


def test_a_chain_inside_another_sites_branch_is_rewritten_once():
    """The outer site's branch computes through the inner chain as rewritten (its nodes are
    not copied for the outer site: they read nothing the outer site rewires)."""
    torch.manual_seed(0)
    model = ChainInsideABranch()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 8)
    converted = hcpass.convert(model, (x,), streams=4)
    assert op_counts(converted.graph_module)["post_res"] == 3
    assert sum(n.target is F.gelu for n in converted.graph_module.graph.nodes) == 2
    models.assert_computes_like(converted, original, x)
    assert all(p.grad is not None for p in converted.mixers.parameters())
