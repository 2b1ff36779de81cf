"""Does hcpass help a model learn? Plain vs every manifold and Attention Residuals on the
demo's byte corpus.

    python benchmarks/learning.py                       # 8 blocks, 3 seeds, all variants
    python benchmarks/learning.py --width 64 --context 32 --batch 16 --steps 1000 --jobs 8
    python benchmarks/learning.py --from-plain 150      # convert a trained plain model
    python benchmarks/learning.py --long                # issue 26: 5M tokens a run, resumable

The model, corpus, batches, optimizer and schedule are `hcpass demo`'s (`hcpass.tools.demo`), at
a depth where depth matters (8 blocks: 16 residual sites) but narrower and shorter (width
32, context 16, batch 8, 150 steps), because converted models train in eager PyTorch on CPU
at 3-5x plain's step time: 24 runs at this size took 2.1 min on 2 CPU cores (lightly
loaded; expect 2-3x that on a busy machine). Every variant of a seed starts
from the same initial weights and sees the same batches for the same number of steps; the
only difference is `hcpass.convert` with that manifold and its defaults (init, mixer
learning-rate scale), or, for the ``attnres`` variant, with ``family="attnres"`` (Block
AttnRes, --block-size sites per block: 4 blocks of 4 sites by default). Runs go to --jobs
processes of one thread each.

Per variant, over the seeds: held-out loss (mean +- sample std), steps until the mean
smoothed training loss reaches the plain model's final one, how far the position-mean
H_res moved from its init and from the identity (L1 per row, mean over rows and sites), the
mean cosine between the streams entering the last site (1 = copies), the composite Amax gain
(`hcpass.gain`) at the last depth and its maximum over depth, and the median step time.
For attnres, instead of the H_res and gain columns: the weight its output (the final norm's
input) puts on the chain's input, and on the last block (`hcpass.depth_weights`).

--from-plain N trains the plain model N steps, then continues it for --steps more beside a
converted copy of it (fresh optimizers, the same new batches): does conversion pay on a
model that has already learnt something?

Writes a table, benchmarks/results/learning-<date>.json (one section per mode) and, with
matplotlib, loss and gain plots to --plots (docs/images by default).

--long (issue 26) trains long enough for the differences to exceed seed noise: 4 blocks,
width 64, context 64, batch 16, 5,000 steps (5.1M tokens a run), 3 seeds of plain, sinkhorn
(the default hyper-connections), hc, attnres (full) and attnres-block (--block-size sites a
block), then one seed of each at 8 and 16 blocks (--depths). Each run is a process of its
own at one thread; its result is appended to benchmarks/results/learning-long.json as it
finishes, so a sweep can be stopped (Ctrl-C) and resumed by the same command: runs already
in the file (same name, model and training settings) are skipped. Prints the main table,
each variant's held-out loss minus plain's paired by seed (mean ± std), the same per depth,
and writes the loss curves (learning-long-loss.png, learning-long-depth<L>-loss.png).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import multiprocessing
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import common
import torch
from torch import Tensor, nn

import hcpass
from hcpass.tools import plot
from hcpass.tools.demo.corpus import load_corpus
from hcpass.tools.demo.gpt import GPT, GPTConfig
from hcpass.tools.demo.report import have_matplotlib
from hcpass.tools.demo.train import TrainConfig, torch_threads, train, validation_batches
from hcpass.tools.demo.variants import ATTNRES, BASELINE, TRAIN_LOSS_WINDOW, run_variant

DOCS_IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


@dataclass(frozen=True)
class Task:
    variant: str  # BASELINE, a manifold name or ATTNRES
    gpt: GPTConfig
    cfg: TrainConfig  # its seed is the run's seed
    pretrain: int  # plain steps before conversion; 0: convert the freshly initialised model
    label: str = ""  # the run's name in the tables (default: `variant`)

    @property
    def name(self) -> str:
        return self.label or self.variant

    @property
    def key(self) -> str:
        """What identifies the run in a --long results file: its name and every setting."""
        return json.dumps([self.name, asdict(self.gpt), asdict(self.cfg), self.pretrain])


@cache
def corpus(max_bytes: int) -> tuple[Tensor, Tensor]:
    return load_corpus(max_bytes)


def position_mean_h_res(model: nn.Module, example: Tensor) -> list[Tensor]:
    return [
        site["h_res"].flatten(0, -3).mean(0) for site in hcpass.mixers(model, (example,)).values()
    ]


def row_l1(a: list[Tensor], b: list[Tensor]) -> float:
    """L1 distance per row, averaged over rows and sites."""
    return statistics.fmean((x - y).abs().sum(-1).mean().item() for x, y in zip(a, b, strict=True))


def mixer_state(model: nn.Module, example: Tensor) -> dict[str, Any]:
    """H_res movement, stream similarity and composite gain of a trained converted model."""
    trained = position_mean_h_res(model, example)
    # With phi = 0 at init, H_res is the map of the init bias (the same at every site).
    manifold = next(iter(model.mixers.values())).manifold
    start = manifold.res_map(manifold.split(manifold.init_bias(0))[2]).double()
    eye = torch.eye(manifold.streams, dtype=torch.float64)
    sites = list(hcpass.mixers(model, (example,)).values())
    return {
        "h_res_from_init": row_l1(trained, [start] * len(trained)),
        "h_res_from_identity": row_l1(trained, [eye] * len(trained)),
        "last_site_stream_cosine": sites[-1]["stream_cosine"].mean().item(),
        "gain": hcpass.gain(model, (example,)),
    }


def attnres_state(model: nn.Module, example: Tensor) -> dict[str, Any]:
    """Where a trained attnres model's output reads from: the position-mean weight on the
    chain's input and on its last block (uniform at init: 1 / blocks)."""
    weights = list(hcpass.depth_weights(model, (example,)).values())[-1].weights
    mean = weights.flatten(0, -2).mean(0)
    return {"output_on_input": mean[0].item(), "output_on_last": mean[-1].item()}


def run_task(task: Task) -> dict[str, Any]:
    """One variant, one seed (in a worker process)."""
    cfg, gpt = task.cfg, task.gpt
    with torch_threads(cfg.threads):
        data = corpus(cfg.corpus_bytes)
        held_out = validation_batches(data[1], gpt, cfg)
        torch.manual_seed(cfg.seed)
        base = GPT(gpt)
        if task.pretrain:
            # The same plain run in every task of this seed (deterministic on one thread);
            # the continuation then draws other batches (seed + 1).
            pre = replace(cfg, steps=task.pretrain)
            train(f"{BASELINE}@0", base, base, data, gpt, pre)
            cfg = replace(cfg, seed=cfg.seed + 1)
        manifold = None if task.variant == BASELINE else task.variant
        result, model = run_variant(task.name, manifold, base, data, held_out, cfg)
        record = {"variant": task.name, "seed": task.cfg.seed, "layers": gpt.layers}
        record.update(asdict(result))
        if task.variant == ATTNRES:
            record.update(attnres_state(model, held_out[0][0]))
        elif manifold is not None:
            record.update(mixer_state(model, held_out[0][0]))
    return record


def run_keyed(task: Task) -> tuple[Task, dict[str, Any]]:
    return task, run_task(task)


def smoothed(curve: list[float]) -> list[float]:
    window = TRAIN_LOSS_WINDOW
    return [statistics.fmean(curve[max(0, i + 1 - window) : i + 1]) for i in range(len(curve))]


def mean_curve(runs: list[dict[str, Any]]) -> list[float]:
    return [
        statistics.fmean(step) for step in zip(*(smoothed(r["curve"]) for r in runs), strict=True)
    ]


def mean_gain(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [
        {
            "depth": rows[0]["depth"],
            "forward": statistics.fmean(r["forward"] for r in rows),
            "backward": statistics.fmean(r["backward"] for r in rows),
        }
        for rows in zip(*(r["gain"] for r in runs), strict=True)
    ]


def finite_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that trained every step to a finite held-out loss: the only ones averaged
    or compared (a NaN is reported, never averaged away)."""
    return [r for r in runs if r.get("diverged_at") is None and math.isfinite(r["val_loss"])]


def summarise(runs: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """One row per variant over its finite runs; ``diverged`` lists the others (seed and
    step). A variant none of whose runs is finite has NaN losses and no mixer columns."""
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in variants}
    plain = finite_runs(by_variant[BASELINE])
    target = mean_curve(plain)[-1] if plain else None
    plain_ms = statistics.fmean(r["ms_per_step"] for r in by_variant[BASELINE])
    rows = []
    for variant, everything in by_variant.items():
        group = finite_runs(everything)
        losses = [r["val_loss"] for r in group]
        curve = mean_curve(group) if group else []
        reached = None
        if target is not None:
            reached = next((i + 1 for i, v in enumerate(curve) if v <= target), None)
        row: dict[str, Any] = {
            "variant": variant,
            "seeds": len(everything),
            "finite_seeds": len(group),
            "diverged": [
                {"seed": r["seed"], "step": r.get("diverged_at"), "val_loss": r["val_loss"]}
                for r in everything
                if r not in group
            ],
            "val_loss_mean": statistics.fmean(losses) if losses else math.nan,
            "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "steps_to_plain_final": reached,
            "ms_per_step": statistics.fmean(r["ms_per_step"] for r in everything),
            "step_time_vs_plain": statistics.fmean(r["ms_per_step"] for r in everything) / plain_ms,
            "params": everything[0]["params"],
        }
        if group and "output_on_input" in group[0]:  # attnres: weights over depth
            row.update(
                {
                    key: statistics.fmean(r[key] for r in group)
                    for key in ("output_on_input", "output_on_last")
                }
            )
        elif group and "h_res_from_init" in group[0]:  # hyper-connections: H_res and gain
            gain = mean_gain(group)
            row.update(
                {
                    key: statistics.fmean(r[key] for r in group)
                    for key in ("h_res_from_init", "h_res_from_identity", "last_site_stream_cosine")
                }
            )
            row["gain_last"] = gain[-1]["forward"]
            row["gain_max"] = max(max(g["forward"], g["backward"]) for g in gain)
            row["gain"] = gain
        rows.append(row)
    return rows


def diverged_cell(row: dict[str, Any]) -> str:
    """``0/3``, or which seeds diverged and at which step: ``1/3: seed 1 @ 1128``."""
    cell = f"{len(row['diverged'])}/{row['seeds']}"
    where = [
        f"seed {d['seed']} @ {d['step']}" if d["step"] else f"seed {d['seed']}: {d['val_loss']}"
        for d in row["diverged"]
    ]
    return f"{cell}: {', '.join(where)}" if where else cell


def print_summary(rows: list[dict[str, Any]], steps: int) -> None:
    plain = rows[0]
    header = [
        "variant",
        "held-out loss",
        "vs plain",
        "diverged",
        "steps to plain",
        "H_res moved",
        "from I",
        "stream cos",
        "gain last/max",
        "out on input/last",
        "ms/step",
        "x plain",
    ]
    table = []
    for r in rows:
        mixer = "gain_last" in r  # hyper-connections; attnres has weights over depth instead
        attnres = "output_on_input" in r
        finite = r["finite_seeds"] > 0
        comparable = r is not plain and finite and plain["finite_seeds"] > 0
        table.append(
            [
                r["variant"],
                f"{r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f}" if finite else "diverged",
                f"{r['val_loss_mean'] - plain['val_loss_mean']:+.4f}" if comparable else "-",
                diverged_cell(r),
                str(r["steps_to_plain_final"] or f"> {steps}"),
                f"{r['h_res_from_init']:.3f}" if mixer else "-",
                f"{r['h_res_from_identity']:.3f}" if mixer else "-",
                f"{r['last_site_stream_cosine']:.3f}" if mixer else "-",
                f"{r['gain_last']:.2f}/{r['gain_max']:.2f}" if mixer else "-",
                f"{r['output_on_input']:.2f}/{r['output_on_last']:.2f}" if attnres else "-",
                f"{r['ms_per_step']:.0f}",
                f"{r['step_time_vs_plain']:.1f}",
            ]
        )
    common.print_table(header, table)


def verdict(rows: list[dict[str, Any]], default: str) -> str:
    """The goal of issue 10: the default manifold beats plain by more than 2 plain stds,
    every run of both finite."""
    plain = rows[0]
    row = next((r for r in rows if r["variant"] == default), None)
    if row is None:
        return f"default manifold {default!r} not run"
    for r in (plain, row):
        if r["diverged"]:
            return (
                f"{default} does NOT beat {BASELINE}: {r['variant']} diverged in "
                f"{diverged_cell(r)} seeds"
            )
    margin = plain["val_loss_mean"] - row["val_loss_mean"]
    bar = 2 * plain["val_loss_std"]
    word = "beats" if margin > bar else "does NOT beat"
    return (
        f"{default} {word} {BASELINE} by more than 2 plain seed stds: held-out loss "
        f"{-margin:+.4f} vs plain, needs < -{bar:.4f} (2 x plain's std)"
    )


def write_json(path: Path, section: str, payload: dict[str, Any]) -> Path:
    results = json.loads(path.read_text()) if path.exists() else {}
    results[section] = payload
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def write_plots(directory: Path, stem: str, runs: list[dict], rows: list[dict]) -> list[Path]:
    if not have_matplotlib():
        print(f"plots skipped: {plot.INSTALL_HINT}")
        return []
    variants = [r["variant"] for r in rows if r["finite_seeds"]]
    curves = {v: mean_curve(finite_runs([r for r in runs if r["variant"] == v])) for v in variants}
    written = [
        plot.losses(curves, directory / f"{stem}-loss.png", title="Training loss (mean of seeds)")
    ]
    gains = {r["variant"]: r["gain"] for r in rows if "gain" in r}
    if gains:
        written.append(plot.gains(gains, directory / f"{stem}-gain.png"))
    return written


# --long: issue 26's long runs. 4 blocks x width 64 x context 64 x batch 16 x 5,000 steps
# is 5.1M tokens per run; the main table at 4 blocks over seeds, the depth sweep one seed.
LONG = {"layers": 4, "width": 64, "context": 64, "batch": 16, "steps": 5000, "seeds": 3}
LONG_DEPTHS = "4,8,16"
LONG_OUT = common.RESULTS_DIR / "learning-long.json"
BLOCK = f"{ATTNRES}-block"  # Block AttnRes (--block-size sites per block); ATTNRES is full


def long_tasks(args: argparse.Namespace, names: list[str], cfg: TrainConfig) -> list[Task]:
    """The main table (--seeds seeds at --layers) and the depth sweep (--depth-seeds at each
    of --depths), one task per run, none twice."""
    full = replace(cfg, block_size=None)
    block = replace(cfg, block_size=args.block_size or None)
    methods = {
        BASELINE: (BASELINE, full),
        ATTNRES: (ATTNRES, full),
        BLOCK: (ATTNRES, block),
    }
    runs = [(args.layers, seed) for seed in range(args.seeds)]
    depths = [int(d) for d in args.depths.split(",")]
    runs += [(layers, seed) for layers in depths for seed in range(args.depth_seeds)]
    tasks: dict[str, Task] = {}
    for layers, seed in runs:
        gpt = GPTConfig(context=args.context, width=args.width, layers=layers, heads=args.heads)
        for name in [BASELINE, *names]:
            variant, base = methods.get(name, (name, full))
            task = Task(variant, gpt, replace(base, seed=seed), 0, label=name)
            tasks.setdefault(task.key, task)
    return list(tasks.values())


def load_runs(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["runs"] if path.exists() else []


def save_runs(path: Path, runs: list[dict[str, Any]]) -> None:
    """Write-then-rename: a sweep stopped while writing keeps the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"runs": runs}) + "\n")
    os.replace(tmp, path)


def run_all(tasks: list[Task], path: Path, jobs: int) -> list[dict[str, Any]]:
    """Run the tasks not in `path` yet, each in a fresh process, appending each result to
    `path` as it finishes; returns the runs of `tasks` (old and new). Stopped (Ctrl-C), the
    finished runs stay in the file and the same command resumes. Runs are matched by their
    settings, not by the code: each records its git revision; after a change that matters,
    start a new file (--out)."""
    runs = load_runs(path)
    revision = common.git_revision()
    done = {r["key"] for r in runs}
    pending = [t for t in tasks if t.key not in done]
    have = len(tasks) - len(pending)
    print(f"{have} of {len(tasks)} runs already in {path}; {len(pending)} to run")
    # A fresh process per run (maxtasksperchild=1: nothing carries over from the previous
    # run, Dynamo caches included); spawn, as fork would copy torch's thread pools.
    pool = multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1)
    try:
        for task, record in pool.imap_unordered(run_keyed, pending):
            runs.append({"key": task.key, "git_revision": revision, **record})
            save_runs(path, runs)
            outcome = (
                f"diverged at step {record['diverged_at']}"
                if record["diverged_at"] is not None
                else f"held-out {record['val_loss']:.4f}"
            )
            print(
                f"{task.name} seed {task.cfg.seed}, {task.gpt.layers} blocks: {outcome}, "
                f"{record['seconds'] / 60:.1f} min",
                flush=True,
            )
    except KeyboardInterrupt:
        pool.terminate()
        raise SystemExit(f"stopped; {path} keeps the finished runs: rerun to resume") from None
    pool.close()
    pool.join()
    keys = {t.key for t in tasks}
    return [r for r in runs if r["key"] in keys]


def paired(runs: list[dict[str, Any]], name: str) -> tuple[float, float, int]:
    """Held-out loss of `name` minus plain's, per seed where both are finite: mean, sample
    std (0 for one seed) and the number of seeds."""
    loss = {(r["variant"], r["seed"]): r["val_loss"] for r in finite_runs(runs)}
    deltas = [
        loss[name, seed] - loss[BASELINE, seed]
        for (variant, seed) in loss
        if variant == name and (BASELINE, seed) in loss
    ]
    if not deltas:
        return math.nan, math.nan, 0
    spread = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
    return statistics.fmean(deltas), spread, len(deltas)


def long_verdicts(runs: list[dict[str, Any]], names: list[str]) -> list[str]:
    """Issue 26's goal: each variant beats plain by more than twice the paired seed spread."""
    lines = []
    for name in names:
        mean, spread, seeds = paired(runs, name)
        if not seeds:
            lines.append(f"{name}: no seed where it and {BASELINE} both trained to the end")
            continue
        if seeds < 2:  # one difference has no spread to judge it by
            lines.append(f"{name}: {mean:+.4f} vs {BASELINE} on one seed, no spread to judge")
            continue
        word = "beats" if -mean > 2 * spread else "does NOT beat"
        lines.append(
            f"{name} {word} {BASELINE} by more than 2 paired seed stds: {mean:+.4f} ± "
            f"{spread:.4f} over {seeds} seeds"
        )
    return lines


def depth_table(runs: list[dict[str, Any]], names: list[str], depths: list[int]) -> None:
    """Held-out loss minus plain's per depth (mean over the seeds run at that depth)."""
    header = ["blocks", f"{BASELINE} held-out", *[f"{n} vs plain" for n in names]]
    table = []
    for layers in depths:
        at = [r for r in runs if r["layers"] == layers]
        plain = [r["val_loss"] for r in finite_runs(at) if r["variant"] == BASELINE]
        cells = [str(layers), f"{statistics.fmean(plain):.4f}" if plain else "diverged"]
        for name in names:
            mean, _, seeds = paired(at, name)
            cells.append(f"{mean:+.4f}" if seeds else "-")
        table.append(cells)
    common.print_table(header, table)


def long_mode(args: argparse.Namespace, names: list[str], cfg: TrainConfig) -> None:
    tasks = long_tasks(args, names, cfg)
    begin = time.perf_counter()
    runs = run_all(tasks, args.out, args.jobs)
    print(f"\n{(time.perf_counter() - begin) / 60:.1f} min this time")
    labels = [BASELINE, *names]
    main = [r for r in runs if r["layers"] == args.layers]
    rows = summarise(main, labels)
    tokens = args.steps * args.batch * args.context
    print(
        f"\n{args.layers} blocks, width {args.width}, context {args.context}, batch "
        f"{args.batch}, {args.steps} steps ({tokens / 1e6:.1f}M tokens), {args.seeds} seeds\n"
    )
    print_summary(rows, args.steps)
    print()
    for line in long_verdicts(main, names):
        print(line)
    depths = sorted({r["layers"] for r in runs})
    print(f"\nby depth ({args.depth_seeds} seed(s) each; {args.layers} blocks: seeds 0..)")
    depth_table(runs, names, depths)
    written = write_plots(args.plots, "learning-long", main, rows)
    for layers in depths:
        at = [r for r in runs if r["layers"] == layers and r["seed"] < args.depth_seeds]
        if have_matplotlib() and finite_runs(at):
            curves = {
                name: mean_curve(group)
                for name in labels
                if (group := finite_runs([r for r in at if r["variant"] == name]))
            }
            path = args.plots / f"learning-long-depth{layers}-loss.png"
            title = f"Training loss, {layers} blocks"
            written.append(plot.losses(curves, path, title=title))
    print(f"results in {args.out}" + "".join(f", {p}" for p in written))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    train, model = TrainConfig(), GPTConfig()
    parser.add_argument(
        "--manifolds",
        help=f"comma-separated manifolds and/or {ATTNRES} (default: every registered "
        f"manifold and {ATTNRES})",
    )
    parser.add_argument(
        "--long",
        action="store_true",
        help=f"issue 26's long runs, resumable: {BASELINE}, sinkhorn, hc, {ATTNRES} and {BLOCK} "
        f"at {LONG} by default, plus a depth sweep (--depths); one process per run, each "
        f"result appended to --out (default {LONG_OUT.name}), runs already there skipped",
    )
    parser.add_argument("--depths", default=LONG_DEPTHS, help="--long: (default: %(default)s)")
    parser.add_argument("--depth-seeds", type=int, default=1, help="--long: (default: 1)")
    parser.add_argument("--seeds", type=int, help="(default: 3)")
    parser.add_argument("--steps", type=int, help="(default: 150; --long 5000)")
    parser.add_argument("--layers", type=int, help="(default: 8; --long 4)")
    parser.add_argument("--width", type=int, help="(default: 32; --long 64)")
    parser.add_argument("--heads", type=int, default=model.heads)
    parser.add_argument("--context", type=int, help="(default: 16; --long 64)")
    parser.add_argument("--batch", type=int, help="(default: 8; --long 16)")
    parser.add_argument("--lr", type=float, default=train.lr)
    parser.add_argument("--streams", type=int, default=train.streams)
    parser.add_argument(
        "--block-size",
        type=int,
        default=4,
        help=f"sites per block of the {ATTNRES} variant (default: %(default)s; 0: full)",
    )
    parser.add_argument("--init", choices=hcpass.manifolds.base.INITS)
    parser.add_argument("--mixer-lr-scale", type=float, default=train.mixer_lr_scale)
    parser.add_argument(
        "--corpus-bytes",
        type=int,
        default=train.corpus_bytes,
        help="bytes of the standard library to train and evaluate on, 10%% held out (default: "
        "%(default)s; --long at 5.1M tokens sees 2M bytes 2.8 times: 6000000 sees each about "
        "once). A results file keys runs by it",
    )
    parser.add_argument(
        "--from-plain",
        type=int,
        default=0,
        metavar="N",
        help="train plain N steps first, then continue plain and converted (default: off)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="train under torch.compile (backend='hcpass' for converted variants)",
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--plots", type=Path, default=DOCS_IMAGES, help="(default: docs/images)")
    parser.add_argument(
        "--out",
        type=Path,
        help="results file, a section per mode (default: benchmarks/results/learning-<date>.json;"
        f" --long: {LONG_OUT.name}, one entry per run)",
    )
    args = parser.parse_args(argv)
    short = {"layers": 8, "width": 32, "context": 16, "batch": 8, "steps": 150, "seeds": 3}
    for name, value in (LONG if args.long else short).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        today = datetime.date.today().isoformat()
        args.out = LONG_OUT if args.long else common.RESULTS_DIR / f"learning-{today}.json"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = args.manifolds.split(",") if args.manifolds else hcpass.manifolds.manifold_names()
    if not args.manifolds:
        names = ["sinkhorn", "hc", ATTNRES, BLOCK] if args.long else [*names, ATTNRES]
    if args.from_plain and not args.manifolds:
        names = ["sinkhorn"]  # hcpass.convert's default
    variants = [BASELINE, *names]
    gpt = GPTConfig(context=args.context, width=args.width, layers=args.layers, heads=args.heads)
    cfg = TrainConfig(
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        streams=args.streams,
        block_size=args.block_size or None,
        init=args.init,
        mixer_lr_scale=args.mixer_lr_scale,
        corpus_bytes=args.corpus_bytes,
        threads=1,
        compile=args.compile,
    )
    if args.long:
        long_mode(args, names, cfg)
        return
    tasks = [
        Task(v, gpt, replace(cfg, seed=seed), args.from_plain)
        for seed in range(args.seeds)
        for v in variants
    ]
    begin = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        runs = list(pool.map(run_task, tasks))
    seconds = time.perf_counter() - begin

    rows = summarise(runs, variants)
    mode = f"from plain trained {args.from_plain} steps" if args.from_plain else "from init"
    print(
        f"\n{args.layers} blocks, width {args.width}, context {args.context}, batch "
        f"{args.batch}, {args.steps} steps, {args.seeds} seeds, streams {args.streams}, "
        f"{mode}; {seconds / 60:.1f} min on {args.jobs} processes\n"
    )
    print_summary(rows, args.steps)
    line = verdict(rows, names[0] if args.from_plain else "sinkhorn")
    print(f"\n{line}")
    section = f"from_plain_{args.from_plain}" if args.from_plain else "from_init"
    path = write_json(
        args.out,
        section,
        {
            "git_revision": common.git_revision(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "jobs": args.jobs,
            "seconds": seconds,
            "model": asdict(gpt),
            "train": asdict(cfg),
            "pretrain_steps": args.from_plain,
            "verdict": line,
            "summary": rows,
            "runs": runs,
        },
    )
    stem = "learning-from-plain" if args.from_plain else "learning"
    written = write_plots(args.plots, stem, runs, rows)
    print(f"wrote {path}" + "".join(f", {p}" for p in written))


if __name__ == "__main__":
    main()
