"""The CUDA lowering's cross-site fusion (`hcpass.lowering.passes.fuse_across_sites`): which site
boundaries become one ``hcpass::post_res_coeffs_pre``, and that the fused graph computes the
same values and gradients (on CPU the fused op runs its reference)."""

from __future__ import annotations

import pytest
import torch
from expecttest import TestCase
from torch import fx, nn

import hcpass
from hcpass.lowering.passes import pass_plan
from hcpass.lowering.passes.fuse_across_sites import FuseAcrossSites
from hcpass.manifolds import create
from tests import models
from tests.graphs import body, op_counts

OPS = torch.ops.hcpass


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(4)
        self.f = nn.Linear(4, 4)
        self.ln2 = nn.LayerNorm(4)
        self.g = nn.Linear(4, 4)

    def forward(self, x):
        x = x + self.f(self.ln1(x))
        return x + self.g(self.ln2(x))


def fused(model: nn.Module, inputs: tuple, streams: int = 2) -> fx.GraphModule:
    gm = hcpass.convert(model, inputs, streams=streams).graph_module
    FuseAcrossSites()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm


class TestWhichBoundariesFuse(TestCase):
    def test_consecutive_sites_share_one_op(self):
        gm = fused(TwoBlocks(), (torch.randn(2, 3, 4),))
        self.assertExpectedInline(
            body(gm),
            """\
coeffs_default = torch.ops.hcpass.coeffs.default(args_0_streams, f_phi, f_alpha, f_bias, SPEC)
getitem = coeffs_default[0]
getitem_1 = coeffs_default[1]
getitem_2 = coeffs_default[2]
pre_default = torch.ops.hcpass.pre.default(args_0_streams, getitem)
layer_norm = torch.nn.functional.layer_norm(pre_default, (4,), ln1.weight, ln1.bias, 1e-05)
linear = torch.nn.functional.linear(layer_norm, f.weight, f.bias)
post_res_coeffs_pre_default = torch.ops.hcpass.post_res_coeffs_pre.default(args_0_streams, linear, getitem_1, getitem_2, g_phi, g_alpha, g_bias, SPEC)
getitem_6 = post_res_coeffs_pre_default[0]
getitem_8 = post_res_coeffs_pre_default[2]
getitem_9 = post_res_coeffs_pre_default[3]
getitem_10 = post_res_coeffs_pre_default[4]
layer_norm_1 = torch.nn.functional.layer_norm(getitem_10, (4,), ln2.weight, ln2.bias, 1e-05)
linear_1 = torch.nn.functional.linear(layer_norm_1, g.weight, g.bias)
post_res_default_1 = torch.ops.hcpass.post_res.default(getitem_6, linear_1, getitem_8, getitem_9)
mean = post_res_default_1.mean(0)
return (mean, post_res_default_1)""",
        )

    def test_every_boundary_of_a_chain_fuses(self):
        gm = fused(models.tiny_gpt(layers=3), models.token_inputs()[0], streams=4)
        counts = op_counts(gm)
        # 6 sites in one chain: the first keeps coeffs and pre, the last keeps its merge
        self.assertEqual(counts["post_res_coeffs_pre"], 5)
        self.assertEqual((counts["coeffs"], counts["pre"], counts["post_res"]), (1, 1, 1))

    def test_a_norm_between_sites_keeps_them_apart_and_the_log_says_why(self):
        with self.assertLogs("hcpass", level="INFO") as logs:
            gm = fused(models.PostNorm(), (torch.randn(2, 3, 4),))
        message = logs.output[-1]
        self.assertIn("fused 0 of 2 site boundaries", message)
        self.assertIn(
            "post_res_default: no site reads its output directly (it goes to flatten)", message
        )
        counts = op_counts(gm)
        self.assertNotIn("post_res_coeffs_pre", counts)
        self.assertEqual((counts["coeffs"], counts["pre"], counts["post_res"]), (2, 2, 2))

    def test_boundaries_inside_checkpoint_regions_fuse(self):
        """Each checkpointed block is a region whose body holds its two sites: the boundary
        between them fuses inside the body; the one between two regions cannot."""

        gm = fused(models.CheckpointedGPT(reentrant=False), models.token_inputs()[0], streams=4)
        regions = [m for m in gm.children() if isinstance(m, fx.GraphModule)]
        self.assertEqual(len(regions), 2)
        for region in regions:
            counts = op_counts(region)
            self.assertEqual(counts.get("post_res_coeffs_pre"), 1)
            self.assertEqual((counts["coeffs"], counts["pre"], counts["post_res"]), (1, 1, 1))

    def test_a_side_reader_reads_the_fused_merge(self):
        gm = fused(models.SideReader(), (torch.randn(2, 3, 4),))
        (boundary,) = [n for n in gm.graph.nodes if n.target is OPS.post_res_coeffs_pre.default]
        (merge,) = [u for u in boundary.users if u.args[1] == 0]
        self.assertIn("mean", {u.target for u in merge.users})  # the hidden state


def three_sites(x, y_scale, phi, alpha, bias, spec):
    """Three sites of one chain written with the ops, tanh standing in for the branches."""
    h_pre, h_post, h_res = OPS.coeffs.default(x, phi[0], alpha[0], bias[0], spec)
    for site in (1, 2):
        y = torch.tanh(OPS.pre.default(x, h_pre) * y_scale)
        x = OPS.post_res.default(x, y, h_post, h_res)
        h_pre, h_post, h_res = OPS.coeffs.default(x, phi[site], alpha[site], bias[site], spec)
    y = torch.tanh(OPS.pre.default(x, h_pre) * y_scale)
    return OPS.post_res.default(x, y, h_post, h_res).mean(0), h_res


def three_site_inputs() -> tuple[list[torch.Tensor], str]:
    n, C = 4, 8
    m = create("sinkhorn", n)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, C, dtype=torch.float64, generator=gen)
    params = [
        torch.randn(3, *m.phi_shape(C), dtype=torch.float64, generator=gen) / C,
        0.5 + torch.rand(3, 3, dtype=torch.float64, generator=gen),
        m.init_bias(0).double() + 0.3 * torch.randn(3, m.num_logits, generator=gen).double(),
    ]
    leaves = [x, torch.tensor(1.5, dtype=torch.float64), *params]
    return [t.requires_grad_() for t in leaves], m.spec()


def values_and_gradients(fn, leaves: list[torch.Tensor], spec: str) -> list[torch.Tensor]:
    out = fn(*leaves, spec)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in out]
    loss = sum((o * w).sum() for o, w in zip(out, weights, strict=True))
    return [*out, *torch.autograd.grad(loss, leaves)]


def traced(fuse: bool, spec: str) -> fx.GraphModule:
    gm = fx.symbolic_trace(three_sites, concrete_args={"spec": spec})
    if fuse:
        pass_plan(cuda=True).lower(gm.graph)
        gm.recompile()
    return gm


def test_fused_graph_computes_the_same_values_and_gradients():
    leaves, spec = three_site_inputs()
    fusing = traced(True, spec)
    counts = op_counts(fusing)
    assert (counts["coeffs"], counts["pre"], counts["post_res"]) == (1, 1, 1)
    assert counts["post_res_coeffs_pre"] == 2
    want = values_and_gradients(traced(False, spec), leaves, spec)
    got = values_and_gradients(fusing, leaves, spec)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_inductor_compiles_the_fused_op_forward_and_backward():
    """What the CUDA path hands Inductor: the fused op as an extern kernel, its backward
    traced by AOTAutograd from the op's fake kernel and autograd formula (here on CPU, where
    the op runs its reference)."""
    leaves, spec = three_site_inputs()
    fusing = traced(True, spec)
    want = values_and_gradients(fusing, leaves, spec)
    got = values_and_gradients(torch.compile(fusing, fullgraph=True), leaves, spec)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", models.zoo(["tiny_gpt", "llama"]))
def test_backend_on_the_cuda_path_matches_eager(name, monkeypatch):
    """backend="hcpass" lowering a converted model as it does for CUDA inputs -- boundaries
    fused, ops left to Inductor as extern kernels -- here on CPU, where the ops run their
    references: forward and gradients equal the eager run."""
    import hcpass.lowering.backend

    monkeypatch.setattr(hcpass.lowering.backend, "_on_cuda", lambda example_inputs: True)
    lowered = []
    monkeypatch.setattr(hcpass.lowering.backend, "_compile_fx", recording_compile_fx(lowered))
    factory, inputs, _ = models.ZOO[name]
    args, kwargs = inputs()
    converted = hcpass.convert(factory(), args, kwargs, streams=4, sinkhorn_iters=4)
    with torch.no_grad():
        for p in converted.mixers.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    params = [p for p in converted.parameters() if p.requires_grad]

    def run(fn):
        out = models.logits(fn(*args, **kwargs))
        return [out, *torch.autograd.grad(out.square().mean(), params, allow_unused=True)]

    want = run(converted)
    # The CPU path may have compiled this model class with these options already
    # (tests/test_models.py), and Dynamo would rightly reuse that graph for the same
    # function; here the backend must lower it as for CUDA inputs.
    torch._dynamo.reset()
    got = run(torch.compile(converted, backend="hcpass"))
    assert sum(op_counts(gm).get("post_res_coeffs_pre", 0) for gm in lowered) > 0
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def recording_compile_fx(graphs: list[fx.GraphModule]):
    """hcpass.lowering.backend's compile step, keeping the graph it is handed."""
    import hcpass.lowering.backend

    compile_fx = hcpass.lowering.backend._compile_fx

    def compile_and_record(gm: fx.GraphModule, example_inputs, passes):
        graphs.append(gm)
        return compile_fx(gm, example_inputs, passes)

    return compile_and_record
