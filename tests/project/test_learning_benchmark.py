"""benchmarks/learning.py: its summary of runs, diverged ones included."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def learning(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling `common`
    import learning

    return learning


def run(variant: str, seed: int, val_loss: float, diverged_at: int | None = None) -> dict:
    """A made-up record of `run_task` (a plain or attnres run: no H_res columns)."""
    record = {
        "variant": variant,
        "seed": seed,
        "val_loss": val_loss,
        "curve": [3.0, 2.5, 2.0][: diverged_at or 3],
        "ms_per_step": 10.0,
        "params": 100,
        "diverged_at": diverged_at,
    }
    if variant == "attnres":
        record.update(output_on_input=0.2, output_on_last=0.5)
    return record


def test_a_diverged_run_is_reported_and_the_others_kept(learning, capsys):
    """A NaN run used to crash statistics.stdev and lose every run's results."""
    runs = [
        run("plain", 0, 1.90),
        run("plain", 1, 1.92),
        run("attnres", 0, 1.85),
        run("attnres", 1, math.nan, diverged_at=2),
    ]
    plain, attnres = learning.summarise(runs, ["plain", "attnres"])
    assert plain["val_loss_mean"] == pytest.approx(1.91) and plain["diverged"] == []
    assert attnres["finite_seeds"] == 1 and attnres["val_loss_mean"] == 1.85
    (diverged,) = attnres["diverged"]
    assert diverged["seed"] == 1 and diverged["step"] == 2 and math.isnan(diverged["val_loss"])
    learning.print_summary([plain, attnres], 3)
    table = capsys.readouterr().out
    assert "1/2: seed 1 @ 2" in table and "nan" not in table.lower()
    assert "attnres diverged in 1/2: seed 1 @ 2 seeds" in learning.verdict(
        [plain, attnres], "attnres"
    )


def test_a_variant_whose_every_run_diverged_is_not_compared(learning, capsys):
    runs = [run("plain", 0, 1.9), run("attnres", 0, math.nan, diverged_at=1)]
    rows = learning.summarise(runs, ["plain", "attnres"])
    assert math.isnan(rows[1]["val_loss_mean"]) and "output_on_input" not in rows[1]
    learning.print_summary(rows, 3)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("attnres"))
    assert line.split()[1:3] == ["diverged", "-"]


TINY_LONG = [
    "--long", "--steps", "3", "--layers", "1", "--width", "16", "--heads", "2",
    "--context", "8", "--batch", "2", "--seeds", "1", "--depths", "1,2", "--manifolds", "hc",
    "--jobs", "2",
]  # fmt: skip


def test_long_mode_appends_each_run_and_resumes(learning, tmp_path, capsys):
    """One process per run, each result in the file as it finishes; a rerun skips them."""
    out = tmp_path / "long.json"
    args = [*TINY_LONG, "--out", str(out), "--plots", str(tmp_path)]
    learning.main(args)
    printed = capsys.readouterr().out
    assert "0 of 4 runs already in" in printed and "4 to run" in printed
    runs = json.loads(out.read_text())["runs"]
    # seed 0 at 1 block (the main table, and the sweep's first depth) and at 2 blocks
    assert sorted((r["variant"], r["layers"], r["seed"]) for r in runs) == [
        ("hc", 1, 0), ("hc", 2, 0), ("plain", 1, 0), ("plain", 2, 0),
    ]  # fmt: skip
    assert all(len(r["curve"]) == 3 and r["diverged_at"] is None for r in runs)
    assert re.search(r"hc: [+-]\d\.\d{4} vs plain on one seed, no spread to judge", printed)

    learning.main(args)  # nothing left to run
    assert "4 of 4 runs already in" in capsys.readouterr().out

    stopped = [r for r in runs if not (r["variant"] == "hc" and r["layers"] == 2)]
    out.write_text(json.dumps({"runs": stopped}))  # as if stopped before the last run
    learning.main(args)
    assert "3 of 4 runs already in" in capsys.readouterr().out
    resumed = json.loads(out.read_text())["runs"]
    assert len(resumed) == 4 and resumed[:3] == stopped
    assert (resumed[3]["variant"], resumed[3]["layers"]) == ("hc", 2)
    if importlib.util.find_spec("matplotlib") is not None:
        names = {p.name for p in tmp_path.iterdir()}
        assert {"learning-long-loss.png", "learning-long-depth2-loss.png"} <= names


def test_one_seed_gets_no_verdict_against_twice_the_spread(learning):
    """With one seed the paired spread is unknown, not zero: any gain used to pass the bar."""
    runs = [run("plain", 0, 1.90), run("hc", 0, 1.85)]
    (line,) = learning.long_verdicts(runs, ["hc"])
    assert line == "hc: -0.0500 vs plain on one seed, no spread to judge"
    runs += [run("plain", 1, 1.92), run("hc", 1, 1.86)]
    (line,) = learning.long_verdicts(runs, ["hc"])
    assert line.startswith("hc beats plain by more than 2 paired seed stds: -0.0550 ± 0.0071")
