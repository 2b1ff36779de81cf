"""hcpass.plot writes readable image files, and says how to get matplotlib when it is missing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import hcpass
from hcpass.tools import inspection, plot
from hcpass.tools.demo.gpt import GPT
from tests.factories import TINY
from tests.models import TwoChains

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib (hcpass[plot])"
)
PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    ids = torch.randint(0, TINY.vocab, (2, TINY.context))
    model = hcpass.convert(GPT(TINY), (ids,), streams=4, manifold="hc")
    return model, (ids,)


@needs_matplotlib
def test_mixers_writes_one_heatmap_per_site(converted, tmp_path):
    model, inputs = converted
    out = plot.mixers(model, inputs, tmp_path / "sub" / "mixers.png", title="hc")
    assert out == tmp_path / "sub" / "mixers.png"
    assert is_png(out)


@needs_matplotlib
def test_gain_writes_a_curve(converted, tmp_path):
    model, inputs = converted
    assert is_png(plot.gain(model, inputs, tmp_path / "gain.png", label="hc"))


@needs_matplotlib
@pytest.mark.parametrize("block_size", [None, 2])
def test_depth_weights_writes_a_heatmap(block_size, tmp_path):
    ids = torch.randint(0, TINY.vocab, (2, TINY.context))
    model = hcpass.convert(GPT(TINY), (ids,), family="attnres", block_size=block_size)
    with torch.no_grad():
        for query in model.mixers.parameters():
            query.normal_()
    out = plot.depth_weights(model, (ids,), tmp_path / "depth.png", title="attnres")
    assert out == tmp_path / "depth.png"
    assert is_png(out)


@needs_matplotlib
def test_depth_weights_draws_a_panel_per_chain(tmp_path):
    x = torch.randn(2, 5, 16)
    model = hcpass.convert(TwoChains(), (x,), family="attnres")
    assert is_png(plot.depth_weights(model, (x,), tmp_path / "chains.png"))


def test_depth_weights_plot_needs_an_attnres_model(converted, tmp_path):
    model, inputs = converted
    with pytest.raises(TypeError, match="family='attnres'"):
        plot.depth_weights(model, inputs, tmp_path / "depth.png")
    assert not (tmp_path / "depth.png").exists()


@needs_matplotlib
def test_gains_switches_to_log_scale_for_exploding_products(tmp_path):
    rows = [{"depth": d, "forward": 3.0**d, "backward": 2.0**d} for d in range(1, 9)]
    flat = [{"depth": d, "forward": 1.0, "backward": 1.0} for d in range(1, 9)]
    assert is_png(plot.gains({"hc": rows, "sinkhorn": flat}, tmp_path / "gain_log.png"))


def _profile(stream: list[float], grad: list[float | None], loss: float | None = 1.0):
    sites = tuple(
        inspection.SiteProfile(f"s{d}", "s1", d, s, 0.1 * s, s, g)
        for d, (s, g) in enumerate(zip(stream, grad, strict=True), 1)
    )
    return inspection.DepthProfile("plain", sites, loss)


@needs_matplotlib
def test_depth_profile_writes_magnitude_and_gradient_panels(converted, tmp_path):
    model, inputs = converted
    ids = inputs[0]

    def loss_fn(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())

    out = plot.depth_profile(model, inputs, tmp_path / "depth.png", loss_fn=loss_fn, label="hc")
    assert out == tmp_path / "depth.png"
    assert is_png(out)


@needs_matplotlib
def test_depth_profiles_say_which_model_went_non_finite(monkeypatch, tmp_path):
    drawn = []
    monkeypatch.setattr(plot, "_save", lambda fig, path: drawn.append(fig) or Path(path))
    profiles = {
        "plain": _profile([1.0, 1.4, 1.7, 2.0], [0.5, 0.4, 0.3, 0.2]),
        "hc": _profile([1.0, float("nan"), float("nan"), float("nan")], [float("nan")] * 4),
    }
    plot.depth_profiles(profiles, tmp_path / "depth.png")
    (fig,) = drawn
    magnitude, gradient = fig.axes
    for ax in (magnitude, gradient):
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert labels == ["plain", "hc (non-finite values)"]
    assert len(magnitude.get_lines()) == 4  # branch output and stream, per model


@needs_matplotlib
def test_depth_profiles_without_a_loss_have_no_gradient_panel(tmp_path):
    profile = _profile([1.0, 2.0], [None, None], loss=None)
    assert is_png(plot.depth_profiles({"plain": profile}, tmp_path / "magnitudes.png"))


@needs_matplotlib
def test_losses_writes_curves_and_difference_panel(tmp_path):
    curves = {
        "plain": [5.5 - 0.01 * i for i in range(100)],
        "sinkhorn": [5.5 - 0.011 * i for i in range(100)],
    }
    assert is_png(plot.losses(curves, tmp_path / "losses.png"))
    assert is_png(plot.losses({"only": [3.0]}, tmp_path / "one.png"))


@needs_matplotlib
def test_heatmaps_accept_many_streams(tmp_path):
    eye = torch.eye(12)
    assert is_png(plot.heatmaps({"a": eye, "b": -eye}, tmp_path / "wide.png"))


def test_missing_matplotlib_says_how_to_install_it(monkeypatch, tmp_path):
    # A None entry in sys.modules makes importing that module raise ImportError; submodules
    # already imported by other tests are cached under their own names.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'hcpass\[plot\]'"):
        plot.losses({"plain": [1.0, 0.5]}, tmp_path / "losses.png")
    assert not (tmp_path / "losses.png").exists()
