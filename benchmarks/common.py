"""What the benchmark scripts share: the CUDA check, timing, the columns of implementations
against a memory-traffic bound, the results file."""

from __future__ import annotations

import datetime
import gc
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hcpass.text import table

# HCPASS_RESULTS_DIR: elsewhere, for a dry run (gpu_session.sh --dry-run) that must not add
# results to the repository.
RESULTS_DIR = Path(
    os.environ.get("HCPASS_RESULTS_DIR") or Path(__file__).resolve().parent / "results"
)


def require_cuda(script: str) -> None:
    """Exit with a clear message when there is no GPU to measure."""
    if not torch.cuda.is_available():
        sys.exit(
            f"{script} measures GPU kernels and needs a CUDA device; none is available "
            "(torch.cuda.is_available() is False)."
        )


def median_ms(fn: Callable[[], Any], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of `fn` in ms (triton.testing.do_bench: warmup, L2 flushed between runs).
    Without CUDA (a dry run on CPU) one call after one warmup call, on the wall clock."""
    if not torch.cuda.is_available():
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def copy_bandwidth_gbs(nbytes: int = 1 << 30, device: str = "cuda") -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def git_revision() -> str:
    """HEAD's commit; HCPASS_COMMIT names it where the tree travels without .git (a lent GPU)."""
    if os.environ.get("HCPASS_COMMIT"):
        return os.environ["HCPASS_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def environment() -> dict[str, Any]:
    if not torch.cuda.is_available():  # the CPU benchmarks (compile_time.py, cpu_step.py)
        return {
            "device": f"cpu-{len(os.sched_getaffinity(0))}-cores",
            "git_revision": git_revision(),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
        }
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "git_revision": git_revision(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }


def write_results(section: str, payload: dict[str, Any]) -> Path:
    """Store `payload` under `section` of benchmarks/results/<device>-<date>.json (both
    scripts write the same file, each its own section)."""
    env = environment()
    device = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    path = RESULTS_DIR / f"{device}-{env['date']}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[section] = {**env, **payload}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """The benchmarks' tables: every column right-aligned (`hcpass.text.table`)."""
    print(table(rows, header=header, align=">" * len(header)))


# ------------------------------------------------ columns: implementations against a bound
Times = dict[str, float | str]  # phase -> milliseconds, or why there is no time


def run_column(
    measure: Callable[[], Times], phases: Sequence[str], optional: bool = False
) -> Times:
    """One implementation's times by phase. A failure fills the column with the reason and
    the benchmark goes on: ``n/a`` (an `optional` library that is not installed), ``oom``,
    ``err: ...`` (the whole message is in the JSON)."""
    try:
        return measure()
    except Exception as e:  # a benchmark reports a broken column and goes on
        if optional and isinstance(e, ImportError):
            return dict.fromkeys(phases, f"n/a: {e}")
        if isinstance(e, torch.OutOfMemoryError):
            return dict.fromkeys(phases, "oom")
        return dict.fromkeys(phases, f"err: {type(e).__name__}: {e}")
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def require_measured(columns: dict[str, Times]) -> None:
    """A dry run fails on a column that broke (only a cell marked ``n/a`` may be missing):
    a GPU session would have lost that column."""
    broken = {
        f"{name} {phase}": value
        for name, column in columns.items()
        for phase, value in column.items()
        if isinstance(value, str) and not value.startswith("n/a")
    }
    if broken:
        sys.exit(f"dry run: broken columns: {broken}")


def cell(value: float | str) -> str:
    """A time in microseconds, or the reason without its message."""
    if isinstance(value, str):
        return value.split(":")[0]
    return f"{value * 1e3:.0f}"


def print_against_bound(
    title: str,
    phases: Sequence[str],
    bounds: dict[str, int],
    columns: dict[str, Times],
    bandwidth: float,
    keys: dict[str, Any],
) -> list[dict[str, Any]]:
    """Print a table of `columns` by phase against the memory-traffic bound (`bounds`: the
    bytes each of `phases` must move, over the device's copy `bandwidth` in GB/s), with hcpass's
    GB/s and its time over the bound; return a record per phase with `keys` in front."""
    print(f"\n{title} (times in us)")
    names = list(columns)
    header = ["phase", "bound", *(n.replace("_", " ") for n in names), "hcpass GB/s", "x bound"]
    rows, records = [], []
    for phase in phases:
        nbytes = bounds[phase]
        bound_ms = nbytes / bandwidth / 1e6
        ours = columns.get("hcpass", {}).get(phase)
        measured = isinstance(ours, float)
        rows.append(
            [
                phase,
                cell(bound_ms),
                *(cell(columns[name][phase]) for name in names),
                f"{nbytes / ours / 1e6:.0f}" if measured else "-",
                f"{ours / bound_ms:.2f}" if measured else "-",
            ]
        )
        records.append(
            {
                **keys,
                "phase": phase,
                "bytes": nbytes,
                "bound_ms": bound_ms,
                **{f"{name}_ms": columns[name][phase] for name in names},
            }
        )
    print_table(header, rows)
    return records
