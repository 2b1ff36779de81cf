"""Pictures of a converted model: H_res heatmaps, composite gain over depth, Attention
Residuals' weights over depth, magnitudes and gradients over depth (plain models too), loss
curves.

matplotlib is an optional extra (``pip install 'hcpass[plot]'``); it is imported when a
picture is drawn, not when this module is imported, so ``import hcpass`` works without matplotlib.
Every function writes one image to `path` (the format follows the suffix, e.g. ``.png``,
``.svg``) and returns the path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hcpass.tools import inspection

INSTALL_HINT = "hcpass.plot needs matplotlib: pip install 'hcpass[plot]'"

# Above this ratio between the largest and smallest value a linear axis hides the small
# ones (HC's unconstrained gain grows geometrically over depth), so switch to log scale.
LOG_SCALE_RATIO = 20.0


def _figure(**kwargs: Any) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    # A bare Figure rather than pyplot: no global backend or figure registry is touched (a
    # notebook's inline backend keeps working) and there is nothing to close afterwards.
    return Figure(**kwargs)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


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
    coefficients = inspection.mixers(model, example_inputs, example_kwargs)
    if not coefficients:
        raise ValueError("no mixer ran in the forward on example_inputs: nothing to plot")
    h_res = {name: _mean_over_positions(c["h_res"], 2) for name, c in coefficients.items()}
    return heatmaps(h_res, path, title=title)


def heatmaps(
    matrices: Mapping[str, torch.Tensor], path: str | Path, *, title: str | None = None
) -> Path:
    """One annotated n x n heatmap per entry of `matrices` (site name -> H_res)."""
    names = list(matrices)
    n = next(iter(matrices.values())).shape[-1]
    cols = min(len(names), 4 if n <= 4 else 3)
    rows = math.ceil(len(names) / cols)
    cell = min(0.55 * max(n, 3) + 0.6, 4.5)  # inches per heatmap
    fig = _figure(figsize=(cols * cell + 1.2, rows * cell + 0.8))
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = max(1.0, max(float(m.abs().max()) for m in matrices.values()))
    image = None
    for ax, name in zip(axes.flat, names, strict=False):  # spare axes are hidden below
        m = matrices[name].double().cpu()
        image = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        # Entries of 1e-4 print as 0.00: say how far from diagonal the matrix really is.
        off = (m - torch.diag_embed(m.diagonal())).abs().max()
        ax.set_title(f"{name}\nmax |off-diagonal| {float(off):.1e}", fontsize=8)
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.tick_params(labelsize=7, length=0)
        if n <= 8:  # beyond that the numbers overlap
            for (i, j), value in _entries(m):
                shade = "white" if abs(value) > 0.6 * vmax else "black"
                label = f"{value:.2f}".replace("-0.00", "0.00")
                ax.text(j, i, label, ha="center", va="center", fontsize=7, color=shade)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="H_res[i, j] (into i from j)")
    fig.suptitle(title or "H_res per site (mean over positions)", fontsize=11)
    return _save(fig, path)


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
    rows = inspection.gain(model, example_inputs, example_kwargs)
    return gains({label or type(model).__name__: rows}, path)


def gains(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """Several models' `hcpass.gain` rows on one plot (label -> rows): forward gain solid,
    backward gain dashed, one colour per label."""
    fig = _figure(figsize=(7, 4.2))
    ax = fig.subplots()
    values = [1.0]
    for index, (label, rows) in enumerate(curves.items()):
        depth = [int(r["depth"]) for r in rows]
        forward = [float(r["forward"]) for r in rows]
        backward = [float(r["backward"]) for r in rows]
        values += forward + backward
        color = f"C{index % 10}"
        # Distinct markers and shrinking sizes keep coinciding curves (every exactly doubly
        # stochastic manifold sits at 1) visible on top of each other.
        marker = "osD^v<>"[index % 7]
        size = max(3.0, 8.0 - 1.5 * index)
        ax.plot(
            depth,
            forward,
            "-",
            marker=marker,
            markersize=size,
            color=color,
            label=f"{label} forward",
        )
        ax.plot(
            depth,
            backward,
            "--",
            marker=marker,
            markersize=size,
            fillstyle="none",
            color=color,
            alpha=0.8,
            label=f"{label} backward",
        )
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > LOG_SCALE_RATIO:
        ax.set_yscale("log")
    else:
        # At least 1 +- 0.1 visible: a drift of 1e-3 should look flat, not like a cliff.
        low, high = min(values), max(values)
        ax.set_ylim(min(low, 0.9) - 0.02 * (high - low), max(high, 1.1) + 0.05 * (high - low))
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("depth d (sites, attention and MLP counted separately)")
    ax.set_ylabel("Amax gain of H_res[d] ... H_res[1]")
    ax.set_title("Composite gain over depth (mean over positions)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(curves) > 2 else 1)
    return _save(fig, path)


# ------------------------------------------------------------------- depth weights
def depth_weights(
    model: nn.Module,
    example_inputs: Sequence[Any],
    path: str | Path,
    *,
    example_kwargs: dict[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """Heatmap of a model converted with ``family="attnres"``: one row per site (then the
    chain's output), one column per source (the chain's input, then its blocks -- sites in
    full Attention Residuals), each cell the weight the row put on that source, averaged
    over positions. A row sums to 1; sources a row cannot see yet are blank (full AttnRes:
    lower-triangular). One panel per chain."""
    found = inspection.depth_weights(model, example_inputs, example_kwargs)
    if not found:
        raise ValueError("no site ran in the forward on example_inputs: nothing to plot")
    panels: dict[str, dict[str, inspection.DepthWeights]] = {}
    for name, site in found.items():
        panels.setdefault(site.chain, {})[name] = site
    widest = max(len(site.sources) for site in found.values())
    tallest = max(len(rows) for rows in panels.values())
    cell = 0.55 if widest <= 12 else 0.3  # inches per cell
    fig = _figure(figsize=(len(panels) * (widest * cell + 2.4) + 1.0, tallest * cell + 2.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    image = None
    for ax, (chain, rows) in zip(axes.flat, panels.items(), strict=True):
        columns = max(rows.values(), key=lambda site: len(site.sources)).sources
        grid = torch.full((len(rows), len(columns)), float("nan"), dtype=torch.float64)
        for i, site in enumerate(rows.values()):
            grid[i, : len(site.sources)] = _mean_over_positions(site.weights, 1).double()
        # NaN where a row has no such source: imshow leaves it blank, as "not readable yet"
        # is not "weight 0".
        image = ax.imshow(grid.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels(columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(list(rows), fontsize=7)
        ax.tick_params(length=0)
        ax.set_xlabel("source (value read)", fontsize=8)
        if len(panels) > 1:
            ax.set_title(f"chain from {chain}", fontsize=9)
        if len(columns) <= 12:  # beyond that the numbers overlap
            for (i, j), value in _entries(grid):
                if not math.isnan(value):
                    shade = "black" if value > 0.6 else "white"  # viridis is light up there
                    label = f"{value:.2f}"
                    ax.text(j, i, label, ha="center", va="center", fontsize=6, color=shade)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="weight over depth")
    fig.suptitle(
        title or "Attention Residuals: weights over depth per site (mean over positions)",
        fontsize=11,
    )
    return _save(fig, path)


# -------------------------------------------------------------------- depth profile
def depth_profile(
    model: nn.Module,
    example_inputs: Sequence[Any],
    path: str | Path,
    *,
    example_kwargs: dict[str, Any] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    label: str | None = None,
) -> Path:
    """`hcpass.depth_profile` of one model drawn by `depth_profiles`."""
    profile = inspection.depth_profile(model, example_inputs, example_kwargs, loss_fn=loss_fn)
    return depth_profiles({label or type(model).__name__: profile}, path)


def depth_profiles(
    profiles: Mapping[str, inspection.DepthProfile],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Several models' `hcpass.depth_profile` (label -> profile) side by side, one colour
    per label: on the left the RMS over depth of each site's branch output (solid) and of
    what its branch reads (dashed: the hidden state entering the block; for Attention
    Residuals the softmax over depth), on the right the gradient norm over each branch's
    parameters (without a loss: no right panel). A label whose numbers are not all finite
    says so in the legend (matplotlib leaves a gap at a NaN)."""
    if not profiles:
        raise ValueError("no profiles to plot")
    with_gradients = any(p.loss is not None for p in profiles.values())
    fig = _figure(figsize=(12 if with_gradients else 6.5, 4.4))
    axes = fig.subplots(1, 2 if with_gradients else 1, squeeze=False).ravel()
    magnitudes: list[float] = []
    gradients: list[float] = []
    for index, (label, profile) in enumerate(profiles.items()):
        color, marker = f"C{index % 10}", "osD^v<>"[index % 7]
        size = max(3.0, 7.0 - 1.0 * index)  # coinciding curves (equal at init) stay visible
        depth = profile.column("depth")
        columns = {name: profile.column(name) for name in ("output_rms", "read_rms", "grad_norm")}
        finite = all(v is None or math.isfinite(v) for values in columns.values() for v in values)
        name = label if finite else f"{label} (non-finite values)"
        style = {"marker": marker, "markersize": size, "color": color}
        axes[0].plot(depth, columns["output_rms"], "-", label=name, **style)
        axes[0].plot(depth, columns["read_rms"], "--", fillstyle="none", alpha=0.8, **style)
        magnitudes += columns["output_rms"] + columns["read_rms"]
        if with_gradients and profile.loss is not None:
            axes[1].plot(depth, columns["grad_norm"], "-", label=name, **style)
            gradients += columns["grad_norm"]
    axes[0].set_ylabel("RMS: branch output (solid), branch input (dashed)")
    axes[0].set_title("Magnitude over depth")
    if with_gradients:
        axes[1].set_ylabel("gradient norm over the branch's parameters")
        axes[1].set_title("Gradient over depth")
    for ax, values in zip(axes, (magnitudes, gradients), strict=False):
        positive = [v for v in values if math.isfinite(v) and v > 0]
        if positive and max(positive) / min(positive) > LOG_SCALE_RATIO:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_xlabel("depth (sites, attention and MLP counted separately)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Magnitudes and gradients over depth", fontsize=11)
    return _save(fig, path)


# --------------------------------------------------------------------------- losses
def losses(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str = "Training loss",
    ylabel: str = "loss (nats/token)",
) -> Path:
    """Per-step loss curves, one colour per name: the raw curve faint, a moving average bold
    (one batch's loss is too noisy to compare variants by eye). With two or more curves a
    second panel shows each moving average minus the first curve's (the baseline): curves
    that differ by a few hundredths overlap in the top panel."""
    smooth = {name: _moving_average(list(curve)) for name, curve in curves.items()}
    names = list(curves)
    compare = len(names) > 1
    fig = _figure(figsize=(7.5, 6.4 if compare else 4.2))
    axes = fig.subplots(
        2 if compare else 1,
        1,
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 2]} if compare else None,
    )
    ax = axes[0, 0]
    tails: list[float] = []
    for index, name in enumerate(names):
        steps = range(1, len(curves[name]) + 1)
        color = f"C{index % 10}"
        ax.plot(steps, curves[name], color=color, alpha=0.15, linewidth=0.8)
        ax.plot(
            steps,
            smooth[name],
            color=color,
            linestyle=_style(index),
            linewidth=1.8,
            label=f"{name} ({smooth[name][-1]:.3f})",
        )
        tails += smooth[name][len(smooth[name]) // 5 :]
    if tails:
        # The first steps (about ln 256 = 5.5 for bytes) would squash the part worth comparing.
        low, high = min(tails), max(tails)
        margin = 0.1 * (high - low) or 0.1
        ax.set_ylim(low - margin, high + margin)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=9, title="moving average (last)", title_fontsize=8)
    if compare:
        base = smooth[names[0]]
        diff_ax = axes[1, 0]
        diff_ax.axhline(0.0, color="C0", linewidth=1.2)
        for index, name in enumerate(names[1:], 1):
            delta = [a - b for a, b in zip(smooth[name], base, strict=False)]
            diff_ax.plot(
                range(1, len(delta) + 1),
                delta,
                color=f"C{index % 10}",
                linestyle=_style(index),
                linewidth=1.5,
                label=name,
            )
        diff_ax.set_ylabel(f"minus {names[0]}")
        diff_ax.legend(fontsize=8, title="below 0: lower loss than " + names[0], title_fontsize=8)
    axes[-1, 0].set_xlabel("step")
    for a in axes.flat:
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(_integer_ticks())
    return _save(fig, path)


def _style(index: int) -> str:
    # Variants often train almost identically (every doubly stochastic manifold whose H_res
    # stays near I): dashes let the curve underneath show through.
    return ("-", "--", "-.", ":")[index % 4]


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _moving_average(values: list[float]) -> list[float]:
    window = max(1, len(values) // 20)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
