"""hcpass.mixers and hcpass.gain, and the papers' depth result: unconstrained HC's
composite gain explodes, the constrained manifolds' stays at 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import PreNormStack, TwoChains
from torch import nn

import hcpass


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
