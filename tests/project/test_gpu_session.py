"""benchmarks/gpu_session.sh --dry-run: the steps a lent GPU machine runs, on CPU with tiny
shapes and the kernels in Triton's interpreter, so the script cannot rot between GPU
sessions (there may be minutes of GPU time, none of it for fixing the script)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MIXER_PHASES = 9


@pytest.mark.slow
def test_gpu_session_dry_run(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TRITON_INTERPRET", None)  # the script sets it
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
    variants = results["train_step"]["variants"]
    assert set(variants) == {"eager", "inductor", "hcpass"}
    for name, measured in variants.items():
        assert isinstance(measured, dict) and math.isfinite(measured["step_ms"]), name


def _results_in_the_repository() -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").iterdir()}
