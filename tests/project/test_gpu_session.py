"""benchmarks/gpu_session.sh --dry-run: the steps a lent GPU machine runs, on CPU with tiny
shapes and the kernels in Triton's interpreter, so the script cannot rot between GPU
sessions (there may be minutes of GPU time, none of it for fixing the script)."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
MIXER_PHASES = 9
STEPS = ("tests", "mixer", "attnres", "train")
# attnres.py --dry-run: one block (C = 24, 2 completed blocks, S = 3), two phases
ATTNRES_ROWS = [(24, 2, 3, "block fwd"), (24, 2, 3, "block fwd+bwd")]


@pytest.mark.slow
def test_gpu_session_dry_run(tmp_path):
    env = _environment()
    before = _results_in_the_repository()
    # called from elsewhere, OUT relative to there: the script finds the repository itself
    run = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_session.sh"), "--dry-run", "session"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert _results_in_the_repository() == before
    out = tmp_path / "session"

    # the GPU tests were collected (on CPU they would only be skipped)
    assert "test_cuda_kernels_match_reference" in (out / "gpu-tests.log").read_text()
    (path,) = (out / "results").glob("*.json")
    results = json.loads(path.read_text())
    mixer = results["mixer"]
    assert mixer["dry_run"] is True and len(mixer["rows"]) == MIXER_PHASES
    for row in mixer["rows"]:
        for name in ("hcpass", "eager", "inductor"):
            assert isinstance(row[f"{name}_ms"], float), (row["phase"], name, row[f"{name}_ms"])
    # the Attention Residuals step: every column measured, the phases' backward kernels
    # too, each after its outputs matched the reference
    attnres = results["attnres"]
    assert attnres["dry_run"] is True
    rows = attnres["rows"]
    assert [(r["C"], r["blocks"], r["sites"], r["phase"]) for r in rows] == ATTNRES_ROWS
    for row in rows:
        for name in ("hcpass", "hcpass_phases", "eager", "inductor"):
            assert isinstance(row[f"{name}_ms"], float), (row["phase"], name, row[f"{name}_ms"])
    assert "block fwd+bwd" in (out / "attnres.log").read_text()

    train = results["train_step"]
    assert train["config"]["preset"] == "gpt-100m" and train["config"]["model"] == "gpt"
    variants = train["variants"]
    assert set(variants) == {"eager", "inductor", "hcpass"}
    for name, measured in variants.items():
        assert isinstance(measured, dict) and math.isfinite(measured["step_ms"]), name

    # each step ran to its end, in order, and said so
    log = (out / "session.log").read_text()
    assert [line.split(":")[0] for line in log.splitlines()] == ["setup", *STEPS, "session"]
    assert all(line.endswith("exit 0") for line in log.splitlines()[1:]), log


@pytest.mark.slow
def test_the_session_stops_a_step_at_its_budget_and_skips_what_does_not_fit(tmp_path):
    """The session's time is a hard budget (a lent machine's call has a limit): a step is
    stopped when the budget runs out, the session goes on and ends non-zero, and a step with
    less than 20 s left is not started; session.log says which."""
    script = str(REPO / "benchmarks" / "gpu_session.sh")
    # the tests step given a test file that takes a minute to collect
    slow = tmp_path / "test_slow_to_collect.py"
    slow.write_text("import time\n\ntime.sleep(60)\n")
    env = {**_environment(), "SESSION_BUDGET_S": "20"}
    run = subprocess.run(
        ["bash", script, "--dry-run", "cut", "tests", str(slow)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert "tests: stopped at its limit of 20 s" in (tmp_path / "cut" / "gpu-tests.log").read_text()
    assert "exit 124" in (tmp_path / "cut" / "session.log").read_text()

    env["SESSION_BUDGET_S"] = "19"
    run = subprocess.run(
        ["bash", script, "--dry-run", "none", "all"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    log = (tmp_path / "none" / "session.log").read_text()
    for name in STEPS:
        assert f"{name}: not run, " in log, log
    assert not (tmp_path / "none" / "results").exists()


@pytest.fixture
def benchmarks(monkeypatch):
    """The benchmark scripts importable (they import their sibling `common`)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))


def test_the_sessions_gpt_has_about_100m_parameters(benchmarks):
    """train_step.py's default preset, what the session runs: GPT-2 small's shape with an 8K
    vocabulary. 12 layers of 7,087,872 (qkv, projection, MLP, two LayerNorms), token
    embedding and untied head 8192 x 768 each, 1024 positions, the final LayerNorm."""
    import train_step

    args = argparse.Namespace(**train_step.PRESETS["gpt-100m"])
    with torch.device("meta"):
        model = train_step.plain_model(args)
    expected = 12 * 7_087_872 + 2 * 8192 * 768 + 1024 * 768 + 2 * 768
    assert sum(p.numel() for p in model.parameters()) == expected == 98_425_344


def test_the_plain_two_phase_baseline_computes_the_reference(benchmarks, monkeypatch):
    """attnres.py times a plain-PyTorch two-phase version against hcpass: it must be the same
    math (held to the reference at 1e-5 in fp32, what the script checks before timing), and
    that check tells a baseline with other math (here another key epsilon) apart."""
    import attnres

    attnres.check_two_phase()
    monkeypatch.setattr(attnres, "two_phase", functools.partial(attnres.two_phase, eps=0.1))
    with pytest.raises(AssertionError, match="not close"):
        attnres.check_two_phase()


def _environment() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TRITON_INTERPRET", None)  # the script sets it
    return env


def _results_in_the_repository() -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").iterdir()}
