"""hcpass.mixers and hcpass.gain, and the papers' depth result: unconstrained HC's
composite gain explodes, the constrained manifolds' stays at 1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hcpass
from hcpass.tools.demo.gpt import GPT, GPTConfig
from tests.models import ParallelBlocks, PreNormStack, TwoChains


class DeepStack(nn.Module):
    """32 residual sites on one stream."""

    def __init__(self, depth: int = 32, width: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _randomise_dynamic_weights(model, scale: float) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mixer in model.mixers.values():
            mixer.phi.copy_(torch.randn(mixer.phi.shape, generator=generator))
            mixer.alpha.fill_(scale)


def test_mixers_returns_per_site_coefficients_in_forward_order():
    x = torch.randn(2, 5, 16)
    converted = hcpass.convert(DeepStack(depth=3), (x,), streams=4)
    found = hcpass.mixers(converted, (x,))
    assert list(found) == ["layers_0", "layers_1", "layers_2"]
    site = found["layers_0"]
    assert site["h_pre"].shape == (2, 5, 4) and site["h_post"].shape == (2, 5, 4)
    assert site["h_res"].shape == (2, 5, 4, 4)
    torch.testing.assert_close(site["h_pre"].sum(-1), torch.ones(2, 5))  # identity init
    torch.testing.assert_close(site["h_post"].mean(-1), torch.ones(2, 5))  # unequal, mean 1


def test_gain_is_one_at_the_identity_init():
    x = torch.randn(2, 5, 16)
    converted = hcpass.convert(DeepStack(depth=4), (x,), streams=4)
    rows = hcpass.gain(converted, (x,))
    assert [r["depth"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["forward"] == pytest.approx(1.0, abs=1e-5)
        assert row["backward"] == pytest.approx(1.0, abs=1e-2)


# Sinkhorn is only approximately doubly stochastic (columns after 20 iterations).
GAIN_TOLERANCE = {"sinkhorn": 0.05, "permutation": 1e-4, "kronecker": 1e-4}


@pytest.mark.parametrize("manifold", ["sinkhorn", "permutation", "kronecker"])
def test_doubly_stochastic_gain_stays_at_one_over_depth(manifold):
    x = torch.randn(2, 6, 16)
    converted = hcpass.convert(DeepStack(), (x,), streams=4, manifold=manifold)
    _randomise_dynamic_weights(converted, scale=1.0)
    rows = hcpass.gain(converted, (x,))
    assert len(rows) == 32
    for row in rows:
        assert row["forward"] == pytest.approx(1.0, abs=GAIN_TOLERANCE[manifold])
        assert row["backward"] == pytest.approx(1.0, abs=GAIN_TOLERANCE[manifold])


@pytest.mark.parametrize("manifold", ["stiefel", "spectral"])
def test_norm_preserving_manifolds_keep_the_spectral_norm_at_one(manifold):
    x = torch.randn(2, 6, 16)
    converted = hcpass.convert(DeepStack(), (x,), streams=4, manifold=manifold)
    _randomise_dynamic_weights(converted, scale=1.0)
    product = torch.eye(4, dtype=torch.float64)
    for site in hcpass.mixers(converted, (x,)).values():
        product = site["h_res"].double() @ product
    spectral_norm = torch.linalg.matrix_norm(product, ord=2)
    torch.testing.assert_close(spectral_norm, torch.ones_like(spectral_norm), atol=1e-3, rtol=0)


def test_unconstrained_hc_gain_explodes_over_depth():
    x = torch.randn(2, 6, 16)
    converted = hcpass.convert(DeepStack(), (x,), streams=4, manifold="hc")
    _randomise_dynamic_weights(converted, scale=1.0)
    rows = hcpass.gain(converted, (x,))
    assert rows[-1]["forward"] > 100 * rows[0]["forward"]
    assert rows[-1]["forward"] > 1e3


def test_mixers_rejects_a_plain_model():
    with pytest.raises(TypeError, match="hcpass.convert"):
        hcpass.mixers(DeepStack(depth=2), (torch.randn(2, 16),))


def test_mixers_and_gain_point_an_attnres_model_to_depth_weights():
    x = torch.randn(2, 16)
    converted = hcpass.convert(PreNormStack(), (x,), family="attnres")
    for report in (hcpass.mixers, hcpass.gain):
        with pytest.raises(TypeError, match="family='attnres'.*hcpass.depth_weights"):
            report(converted, (x,))


# ------------------------------------------------------------------ Attention Residuals
def _naive_weights(values: list[torch.Tensor], query: torch.Tensor) -> torch.Tensor:
    """softmax_i(rsqrt(mean_c v_i^2 + eps) <w, v_i>), [*pos, k], written out again."""
    v = torch.stack(values, -2).double()  # [*pos, k, C]
    logits = (v @ query.double()) / v.pow(2).mean(-1).add(1e-6).sqrt()
    return logits.softmax(-1)


def test_depth_weights_are_uniform_at_init():
    x = torch.randn(2, 5, 16)
    converted = hcpass.convert(PreNormStack(), (x,), family="attnres")
    found = hcpass.depth_weights(converted, (x,))
    assert list(found) == ["layers_0", "layers_1", "layers_2", "layers_2:output"]
    for k, (name, site) in enumerate(found.items(), 1):
        assert site.weights.shape == (2, 5, k), name
        torch.testing.assert_close(site.weights, torch.full((2, 5, k), 1 / k))
        assert site.chain == "layers_0"
    # Full Attention Residuals: every site's output is a source of its own, named by its key.
    assert found["layers_2:output"].sources == ("input", "layers_0", "layers_1", "layers_2")
    assert found["layers_0"].sources == ("input",)


def test_depth_weights_follow_the_queries():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 16)
    model = PreNormStack()
    converted = hcpass.convert(model, (x,), family="attnres")
    queries = {}
    with torch.no_grad():
        for key, module in converted.mixers.items():
            for name, param in module.named_parameters():
                param.copy_(3 * torch.randn_like(param))
                queries[key if name == "query" else f"{key}:output"] = param.detach().clone()
    found = hcpass.depth_weights(converted, (x,))
    # The converted forward written out: each branch reads the weighted values; its norm's
    # eps is divided by k^2 (the rewrite keeps the init function that way).
    values = [x]
    for i, (norm, layer) in enumerate(zip(model.norms, model.layers, strict=True)):
        key = f"layers_{i}"
        if i == 0:
            h = x
            torch.testing.assert_close(found[key].weights, torch.ones(2, 5, 1))
        else:
            alpha = _naive_weights(values, queries[key])
            torch.testing.assert_close(found[key].weights.double(), alpha, atol=1e-5, rtol=0)
            h = (alpha.unsqueeze(-1).float() * torch.stack(values, -2)).sum(-2)
        eps = norm.eps / len(values) ** 2
        values.append(layer(F.layer_norm(h, (16,), norm.weight, norm.bias, eps)).detach())
    output = found["layers_2:output"].weights
    alpha = _naive_weights(values, queries["layers_2:output"])
    torch.testing.assert_close(output.double(), alpha, atol=1e-5, rtol=0)
    torch.testing.assert_close(output.sum(-1), torch.ones(2, 5))
    assert (output - 0.25).abs().max() > 0.1  # no longer uniform


def test_depth_weights_of_block_attnres_read_blocks():
    x = torch.randn(2, 5, 16)
    converted = hcpass.convert(PreNormStack(depth=4), (x,), family="attnres", block_size=2)
    found = hcpass.depth_weights(converted, (x,))
    # Sources: the input, the completed blocks, and the current (partial) block.
    sources = {name: site.sources for name, site in found.items()}
    assert sources == {
        "layers_0": ("input",),
        "layers_1": ("input", "block 1"),
        "layers_2": ("input", "block 1"),
        "layers_3": ("input", "block 1", "block 2"),
        "layers_3:output": ("input", "block 1", "block 2"),
    }
    for site in found.values():
        k = len(site.sources)
        torch.testing.assert_close(site.weights, torch.full((2, 5, k), 1 / k))


def test_depth_weights_need_an_attnres_model():
    x = torch.randn(2, 16)
    with pytest.raises(TypeError, match="family='attnres'"):
        hcpass.depth_weights(PreNormStack(), (x,))
    converted = hcpass.convert(PreNormStack(), (x,), streams=2)
    with pytest.raises(TypeError, match="family='attnres'"):
        hcpass.depth_weights(converted, (x,))


def test_depth_weights_keep_chains_apart():
    x = torch.randn(2, 5, 16)
    converted = hcpass.convert(TwoChains(), (x,), family="attnres")
    found = hcpass.depth_weights(converted, (x,))
    first, second = "first_layers_0", "second_layers_0"
    assert {name: (site.chain, site.sources) for name, site in found.items()} == {
        first: (first, ("input",)),
        "first_layers_1": (first, ("input", first)),
        "first_layers_1:output": (first, ("input", first, "first_layers_1")),
        second: (second, ("input",)),  # a one-site chain: its input, then the output
        f"{second}:output": (second, ("input", second)),
    }


# ------------------------------------------------------------------- depth profile
class ConstantBlocks(nn.Module):
    """`depth` sites ``x = x + block(x)`` whose blocks ignore their input (zero weights) and
    add their bias: ``sqrt(C) e_l``, orthogonal unit-RMS outputs."""

    def __init__(self, depth: int = 4, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        with torch.no_grad():
            for index, block in enumerate(self.blocks):
                block.weight.zero_()
                block.bias.copy_(width**0.5 * torch.eye(width)[index])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def _column(profile, name: str) -> torch.Tensor:
    return torch.tensor(profile.column(name), dtype=torch.float64)


def test_depth_profile_of_blocks_adding_equal_variance_outputs():
    """The stream after l unit-RMS outputs orthogonal to each other and to a unit-RMS input
    has RMS sqrt(1 + l): each block's share of it shrinks with depth (PreNorm dilution)."""
    depth, width = 4, 8
    model = ConstantBlocks(depth, width)
    x = (width**0.5 * torch.eye(width)[-1]).expand(3, width)  # orthogonal to every bias
    target = torch.randn(3, width, generator=torch.Generator().manual_seed(0))
    profile = hcpass.depth_profile(model, (x,), loss_fn=lambda out: (out * target).sum())
    assert profile.family == "plain"
    assert profile.column("site") == [f"blocks_{i}" for i in range(depth)]
    assert profile.column("depth") == [1, 2, 3, 4]
    assert set(profile.column("chain")) == {"blocks_0"}
    sites_so_far = torch.arange(1, depth + 1, dtype=torch.float64)
    torch.testing.assert_close(_column(profile, "output_rms"), torch.ones_like(sites_so_far))
    torch.testing.assert_close(_column(profile, "stream_rms"), (1 + sites_so_far).sqrt())
    torch.testing.assert_close(_column(profile, "read_rms"), sites_so_far.sqrt())
    # d loss / d x_L = target, and each block's output reaches x_L unchanged (zero weights):
    # bias gradient sum_b target_b, weight gradient target^T x_{l-1}.
    target = target.double()
    stream, expected = x.double(), []
    for block in model.blocks:
        weight_grad = target.T @ stream
        expected.append(math.hypot(weight_grad.norm(), target.sum(0).norm()))
        stream = stream + block.bias.detach().double()
    torch.testing.assert_close(_column(profile, "grad_norm"), torch.tensor(expected).double())
    assert profile.loss == pytest.approx(float((stream * target).sum()), rel=1e-6)


def _tiny_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(context=8, width=16, layers=2, heads=2)).eval()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    return model, ids, lambda logits: F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# fp32 forward and backward, the same ops in another order (the mixers' per-stream math)
PROFILE_TOLERANCE = {"rtol": 1e-5, "atol": 1e-7}


def _assert_columns_close(a, b, names):
    for name in names:
        torch.testing.assert_close(
            _column(a, name),
            _column(b, name),
            **PROFILE_TOLERANCE,
            msg=lambda m, name=name: f"{name}: {m}",
        )


@pytest.mark.parametrize("manifold", ["sinkhorn", "hc"])
def test_depth_profile_of_hyper_connections_equals_plain_at_init(manifold):
    model, ids, loss_fn = _tiny_gpt()
    plain = hcpass.depth_profile(model, (ids,), loss_fn=loss_fn)
    converted = hcpass.convert(model, (ids,), streams=4, manifold=manifold)
    profile = hcpass.depth_profile(converted, (ids,), loss_fn=loss_fn)
    assert profile.family == "hyper-connections"
    assert profile.column("site") == plain.column("site") == list(converted.mixers)
    assert profile.column("chain") == plain.column("chain")
    _assert_columns_close(profile, plain, ("read_rms", "output_rms", "stream_rms", "grad_norm"))
    assert all(math.isfinite(g) and g > 0 for g in profile.column("grad_norm"))
    assert profile.loss == pytest.approx(plain.loss, rel=1e-6)


@pytest.mark.parametrize("block_size", [None, 2])
def test_depth_profile_of_attnres_equals_plain_at_init(block_size):
    """The values' sum is the plain stream; a branch reads the mean of its k values, x / k."""
    model, ids, loss_fn = _tiny_gpt()
    plain = hcpass.depth_profile(model, (ids,), loss_fn=loss_fn)
    converted = hcpass.convert(model, (ids,), family="attnres", block_size=block_size)
    profile = hcpass.depth_profile(converted, (ids,), loss_fn=loss_fn)
    assert profile.family == "attnres"
    assert profile.column("site") == plain.column("site")
    _assert_columns_close(profile, plain, ("output_rms", "stream_rms", "grad_norm"))
    size = block_size or 1
    values = [1 + i // size + (i % size != 0) for i in range(len(plain.sites))]
    read = _column(profile, "read_rms") * torch.tensor(values, dtype=torch.float64)
    torch.testing.assert_close(read, _column(plain, "read_rms"), **PROFILE_TOLERANCE)


class BrokenSharedStack(nn.Module):
    """A chain across a graph break, with a weight-shared block run twice."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))
        self.shared = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))

    def forward(self, x):
        x = x + self.first(x)
        torch._dynamo.graph_break()
        x = x + self.shared(x)
        return x + self.shared(x)


@pytest.mark.parametrize(
    ("make", "inputs", "sites"),
    [
        # the shared block's second run is a site of its own (keyed on another parameter)
        (BrokenSharedStack, lambda: torch.randn(3, 8), ["first", "shared", "shared_2"]),
        (
            ParallelBlocks,
            lambda: torch.randint(0, 50, (2, 6)),
            ["attn_0", "mlp_0", "attn_1"],  # as hcpass.explain: mlp(h) + attn(h) is no site
        ),
        (
            TwoChains,
            lambda: torch.randn(2, 5, 16),
            ["first_layers_0", "first_layers_1", "second_layers_0"],
        ),
    ],
    ids=["graph-break-and-shared-block", "parallel-blocks", "two-chains"],
)
def test_depth_profile_follows_the_front_end_s_sites(make, inputs, sites):
    torch.manual_seed(0)
    model, x = make(), inputs()
    weights = torch.randn(model(x).shape)

    def loss_fn(out):
        return (out * weights).sum()

    plain = hcpass.depth_profile(model, x, loss_fn=loss_fn)  # a single tensor is one input
    assert plain.column("site") == sites
    converted = hcpass.depth_profile(hcpass.convert(model, (x,)), (x,), loss_fn=loss_fn)
    assert converted.column("site") == sites
    assert converted.column("chain") == plain.column("chain")
    _assert_columns_close(converted, plain, ("read_rms", "output_rms", "stream_rms", "grad_norm"))


@pytest.mark.hf
def test_depth_profile_of_hf_gpt2_uses_its_loss_and_equals_plain_at_init():
    from tests.models import gpt2

    model = gpt2().eval()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "labels": ids}
    plain = hcpass.depth_profile(model, (), kwargs)
    assert plain.column("site") == [
        "transformer_h_0_attn",
        "transformer_h_0_mlp",
        "transformer_h_1_attn",
        "transformer_h_1_mlp",
    ]
    converted = hcpass.depth_profile(hcpass.convert(model, (), kwargs), (), kwargs)
    _assert_columns_close(converted, plain, ("read_rms", "output_rms", "stream_rms", "grad_norm"))
    assert plain.loss == pytest.approx(model(**kwargs).loss.item(), rel=1e-6)


def test_depth_profile_without_a_loss_has_no_gradients():
    model, ids, _ = _tiny_gpt()
    profile = hcpass.depth_profile(model, (ids,))
    assert profile.loss is None
    assert profile.column("grad_norm") == [None] * 4
    assert all(p.grad is None for p in model.parameters())  # nothing written either way


@pytest.mark.parametrize("convert", [False, True])
def test_depth_profile_reports_non_finite_values(convert):
    model, ids, loss_fn = _tiny_gpt()
    with torch.no_grad():
        model.blocks[1].mlp.fc.bias.fill_(float("nan"))  # the fourth site's branch
    if convert:
        model = hcpass.convert(model, (ids,), streams=4)
    profile = hcpass.depth_profile(model, (ids,), loss_fn=loss_fn)
    assert all(math.isfinite(v) for v in profile.column("output_rms")[:3])
    assert math.isnan(profile.column("output_rms")[3])
    assert math.isnan(profile.column("stream_rms")[3])
    assert math.isnan(profile.loss)
    assert all(math.isnan(g) for g in profile.column("grad_norm"))


def test_depth_profile_needs_residual_sites():
    with pytest.raises(ValueError, match="no residual sites.*hcpass.explain"):
        hcpass.depth_profile(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
