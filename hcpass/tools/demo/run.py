"""``hcpass demo`` itself: parse the flags' configs, train the variants, print and write the
results."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hcpass.tools import plot
from hcpass.tools.demo.corpus import load_corpus
from hcpass.tools.demo.options import choose_manifolds, configs
from hcpass.tools.demo.report import (
    depth_table,
    describe,
    have_matplotlib,
    pictures,
    results_table,
    verdicts,
)
from hcpass.tools.demo.train import torch_threads
from hcpass.tools.demo.variants import BASELINE, TRAIN_LOSS_WINDOW, compare


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The demo; returns what it writes to results.json."""
    begin = time.perf_counter()
    gpt, cfg = configs(args)
    manifolds, notes = choose_manifolds(args.manifolds)
    plots = have_matplotlib()
    if not plots:
        notes.append(f"pictures skipped: {plot.INSTALL_HINT}")
    for note in notes:
        print(f"note: {note}")

    out: Path = args.out
    # Everything that runs the models, pictures included: Dynamo guards on the thread
    # count, so changing it in between would also cost a recompile.
    with torch_threads(cfg.threads):
        data = load_corpus(cfg.corpus_bytes)
        print(describe(gpt, cfg, data))
        results, models, example = compare(gpt, cfg, manifolds, data)
        print()
        print(results_table(results))
        print()
        for line in verdicts(results):
            print(line)
        print(
            f"(one seed, {cfg.steps} steps: rerun with other --seed values before reading much "
            "into small differences)"
        )
        print()
        print("Over depth, first -> last site (hcpass.depth_profile on a held-out batch):")
        print(depth_table(results))
        out.mkdir(parents=True, exist_ok=True)
        written = pictures(out, results, models, example) if plots else []

    summary = {
        "model": asdict(gpt),
        "train": asdict(cfg),
        "train_loss_is": f"mean of the last {TRAIN_LOSS_WINDOW} steps' batch losses",
        "baseline": BASELINE,
        "variants": [asdict(r) for r in results],
        "worse_than_baseline": [
            r.name
            for r in results[1:]
            if r.finite and results[0].finite and round(r.val_loss - results[0].val_loss, 4) > 0
        ],
        "diverged": {r.name: r.diverged_at for r in results if r.diverged_at is not None},
        "notes": notes,
        "seconds": time.perf_counter() - begin,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'results.json'}" + "".join(f", {p.name}" for p in written))
    print(f"total {summary['seconds']:.0f} s")
    return summary
