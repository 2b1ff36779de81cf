"""Pictures of a converted model: H_res heatmaps, composite gain over depth, loss curves.

matplotlib is an optional extra (``pip install 'hcpass[plot]'``); it is imported when a
picture is drawn, not when this module is imported, so ``import hcpass.plot`` always works.
Every function writes one image to `path` (the format follows the suffix, e.g. ``.png``,
``.svg``) and returns the path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

INSTALL_HINT = "hcpass.plot needs matplotlib: pip install 'hcpass[plot]'"

# Above this ratio between the largest and smallest value a linear axis hides the small
# ones (HC's unconstrained gain grows geometrically over depth), so switch to log scale.
LOG_SCALE_RATIO = 20.0


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    # Headless-safe: pictures are written to files, never shown in a window.
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)  # pyplot keeps every open figure alive otherwise
    return path


def _inspect(name: str) -> Any:
    # hcpass.mixers / hcpass.gain are looked up at call time: hcpass imports this module's
    # siblings first, and tests may stand in their own implementation.
    import hcpass

    fn = getattr(hcpass, name, None)
    if fn is None:
        raise RuntimeError(f"this hcpass version has no hcpass.{name}()")
    return fn


# --------------------------------------------------------------------------- mixers
def mixers(
    model: nn.Module,
    example_inputs: Sequence[Any],
    path: str | Path,
    *,
    example_kwargs: dict[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """Heatmap of every site's H_res (averaged over positions), in forward order.

    Row i, column j is how much of stream j flows into stream i (``X'[i] = sum_j
    H_res[i, j] X[j] + ...``); the colour scale is shared and centred on 0, so negative
    entries (hc, spectral, stiefel, grassmann) read as blue and >1 entries stand out."""
    coefficients = _inspect("mixers")(model, example_inputs, example_kwargs)
    if not coefficients:
        raise ValueError("the model has no mixers to plot (was it converted by hcpass?)")
    h_res = {name: _mean_over_positions(c["h_res"], 2) for name, c in coefficients.items()}
    return heatmaps(h_res, path, title=title)


def heatmaps(matrices: Mapping[str, torch.Tensor], path: str | Path, *, title: str | None = None) -> Path:
    """One annotated n x n heatmap per entry of `matrices` (site name -> H_res)."""
    plt = _pyplot()
    names = list(matrices)
    n = next(iter(matrices.values())).shape[-1]
    cols = min(len(names), 4 if n <= 4 else 3)
    rows = math.ceil(len(names) / cols)
    cell = 0.55 * max(n, 3) + 0.6
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 1.2, rows * cell + 0.8), squeeze=False)
    vmax = max(1.0, max(float(m.abs().max()) for m in matrices.values()))
    image = None
    for ax, name in zip(axes.flat, names):
        m = matrices[name].double().cpu()
        image = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.tick_params(labelsize=7, length=0)
        if n <= 8:  # beyond that the numbers overlap
            for (i, j), value in _entries(m):
                shade = "white" if abs(value) > 0.6 * vmax else "black"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=shade)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="H_res[i, j] (into i from j)")
    fig.suptitle(title or "H_res per site (mean over positions)", fontsize=11)
    return _save(plt, fig, path)


def _entries(m: torch.Tensor) -> list[tuple[tuple[int, int], float]]:
    return [((i, j), float(m[i, j])) for i in range(m.shape[0]) for j in range(m.shape[1])]


def _mean_over_positions(t: torch.Tensor, trailing: int) -> torch.Tensor:
    """Mean over every dim but the last `trailing` ones (the positions)."""
    t = t.detach().float()
    return t.reshape(-1, *t.shape[t.dim() - trailing :]).mean(0)


# ----------------------------------------------------------------------------- gain
def gain(
    model: nn.Module,
    example_inputs: Sequence[Any],
    path: str | Path,
    *,
    example_kwargs: dict[str, Any] | None = None,
    label: str | None = None,
) -> Path:
    """Composite Amax gain of the product of H_res over the first d sites, for every depth d:
    forward = max absolute row sum, backward = max absolute column sum (mHC's diagnostic),
    averaged over positions. 1 means signals neither grow nor shrink through the mixers."""
    rows = _inspect("gain")(model, example_inputs, example_kwargs)
    return gains({label or type(model).__name__: rows}, path)


def gains(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """Several models' `hcpass.gain` rows on one plot (label -> rows): forward gain solid,
    backward gain dashed, one colour per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    values = [1.0]
    for index, (label, rows) in enumerate(curves.items()):
        depth = [int(r["depth"]) for r in rows]
        forward = [float(r["forward"]) for r in rows]
        backward = [float(r["backward"]) for r in rows]
        values += forward + backward
        color = f"C{index % 10}"
        ax.plot(depth, forward, "-o", color=color, markersize=3, label=f"{label} forward")
        ax.plot(depth, backward, "--", color=color, alpha=0.8, label=f"{label} backward")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > LOG_SCALE_RATIO:
        ax.set_yscale("log")
    ax.set_xlabel("depth d (sites, attention and MLP counted separately)")
    ax.set_ylabel("Amax gain of H_res[d] ... H_res[1]")
    ax.set_title("Composite gain over depth (mean over positions)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(curves) > 2 else 1)
    return _save(plt, fig, path)


# --------------------------------------------------------------------------- losses
def losses(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str = "Training loss",
    ylabel: str = "loss (nats/token)",
) -> Path:
    """Per-step loss curves, one colour per name: the raw curve faint, a moving average bold
    (a single batch's loss is too noisy to compare variants by eye)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    tails: list[float] = []
    for index, (name, curve) in enumerate(curves.items()):
        steps = list(range(1, len(curve) + 1))
        color = f"C{index % 10}"
        smooth = _moving_average(list(curve))
        ax.plot(steps, curve, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(steps, smooth, color=color, linewidth=1.8, label=f"{name} ({smooth[-1]:.3f})")
        tails += smooth[len(smooth) // 5 :]
    if tails:
        # The first steps (~ln 256 = 5.5 for bytes) would squash the part worth comparing.
        low, high = min(tails), max(tails)
        margin = 0.1 * (high - low) or 0.1
        ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _save(plt, fig, path)


def _moving_average(values: list[float]) -> list[float]:
    window = max(1, len(values) // 20)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
