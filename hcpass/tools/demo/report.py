"""What the demo prints and draws: the run's description, the results table, one verdict per
converted variant, and the pictures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from hcpass.text import table
from hcpass.tools import plot
from hcpass.tools.demo.gpt import GPTConfig
from hcpass.tools.demo.train import TrainConfig
from hcpass.tools.demo.variants import ATTNRES, BASELINE, Result


def describe(gpt: GPTConfig, cfg: TrainConfig, data: tuple[Tensor, Tensor]) -> str:
    return (
        f"byte-level GPT: {gpt.layers} blocks, width {gpt.width}, context {gpt.context}; "
        f"stdlib source: {len(data[0]) / 1e6:.1f} MB to train on, "
        f"{len(data[1]) / 1e6:.1f} MB of other files held out; "
        f"{cfg.steps} steps of {cfg.batch} sequences; "
        f"streams={cfg.streams}, init={cfg.init or 'default'}, "
        f"mixer lr x{cfg.mixer_lr_scale:g}; "
        f"{'torch.compile' if cfg.compile else 'eager'} on {cfg.device}"
    )


def results_table(results: Sequence[Result]) -> str:
    """One row per variant; "vs plain" is the held-out loss minus the plain model's, where
    both trained to finite losses. A diverged run shows the step where it stopped."""
    base = results[0]
    rows = []
    for r in results:
        if r.diverged_at is not None:
            train_loss, val_loss = "-", f"diverged at step {r.diverged_at}"
        else:
            train_loss, val_loss = f"{r.train_loss:.4f}", f"{r.val_loss:.4f}"
        comparable = r is not base and r.finite and base.finite
        delta = f"{r.val_loss - base.val_loss:+.4f}" if comparable else "-"
        rows.append((r.name, train_loss, val_loss, delta, f"{r.ms_per_step:.1f}", f"{r.params:,}"))
    header = ("variant", "train loss", "held-out loss", "vs plain", "ms/step", "params")
    return table(rows, header=header, align="<>>>>>")


def _diverged(r: Result) -> str:
    if r.diverged_at is not None:
        return f"DIVERGED at step {r.diverged_at} (non-finite loss or gradient; stopped there)"
    return f"held-out loss not finite ({r.val_loss})"


def verdicts(results: Sequence[Result]) -> list[str]:
    """One plain sentence per converted variant: better or worse than the baseline, or that
    it (or the baseline) diverged: a NaN is never compared."""
    base = results[0]
    lines = []
    if not base.finite:
        lines.append(f"{BASELINE}: {_diverged(base)}; no variant is compared with it.")
    for r in results[1:]:
        speed = f"{r.ms_per_step / base.ms_per_step:.1f}x the step time of {BASELINE}"
        if not r.finite:
            lines.append(f"{r.name}: {_diverged(r)}; {speed}.")
            continue
        if not base.finite:
            continue
        delta = round(r.val_loss - base.val_loss, 4)  # as printed in the table
        losses = f"{r.val_loss:.4f} vs {base.val_loss:.4f}"
        if delta > 0:
            verdict = f"WORSE than {BASELINE} on held-out loss ({losses}, {delta:+.4f})"
        elif delta < 0:
            verdict = f"better than {BASELINE} on held-out loss ({losses}, {delta:+.4f})"
        else:
            verdict = f"the same held-out loss as {BASELINE} to 4 decimals ({losses})"
        lines.append(f"{r.name}: {verdict}; {speed}.")
    return lines


def depth_table(results: Sequence[Result]) -> str:
    """Per variant, the ends of its depth profile (`hcpass.depth_profile`, after training,
    on a held-out batch): the first and last site's branch input RMS, branch output RMS,
    stream RMS and gradient norm (NaN printed as nan, never left out)."""
    rows = []
    for r in results:
        if r.depth_profile is None:
            continue
        first, last = r.depth_profile.sites[0], r.depth_profile.sites[-1]
        rows.append(
            (
                r.name,
                *(
                    f"{getattr(first, name):.3g} -> {getattr(last, name):.3g}"
                    for name in ("read_rms", "output_rms", "stream_rms", "grad_norm")
                ),
            )
        )
    header = ("variant", "branch input RMS", "branch output RMS", "stream RMS", "gradient norm")
    return table(rows, header=header, align="<>>>>")


def pictures(
    out: Path,
    results: Sequence[Result],
    models: dict[str, nn.Module],
    example: Tensor,
) -> list[Path]:
    """Write losses.png, depth.png (magnitudes and gradients over depth, every variant),
    mixers_<variant>.png, gain.png and (for attnres) depth_attnres.png to `out`."""
    written = [plot.losses({r.name: r.curve for r in results}, out / "losses.png")]
    profiles = {r.name: r.depth_profile for r in results if r.depth_profile is not None}
    if profiles:
        title = "After training, on a held-out batch: magnitudes and gradients over depth"
        written.append(plot.depth_profiles(profiles, out / "depth.png", title=title))
    for name, model in models.items():
        if name == ATTNRES:  # no streams, no H_res: what it learnt is where it reads from
            title = f"{name}: weights over depth per site (mean over positions, held-out batch)"
            path = out / f"depth_{name}.png"
            written.append(plot.depth_weights(model, (example,), path, title=title))
            continue
        title = f"{name}: H_res per site (mean over positions, held-out batch)"
        written.append(plot.mixers(model, (example,), out / f"mixers_{name}.png", title=title))
    gains = {r.name: r.gain for r in results if r.gain}
    if gains:
        written.append(plot.gains(gains, out / "gain.png"))
    return written


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
