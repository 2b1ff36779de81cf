"""hcpass.mixers and hcpass.gain, and the papers' depth result: unconstrained HC's
composite gain explodes, the constrained manifolds' stays at 1."""

from __future__ import annotations

import pytest
import torch
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
