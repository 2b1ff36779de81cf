"""Cold compile time on CPU: the first training step (forward + backward) of the GPT in
gpt.py, plain ``torch.compile`` vs ``torch.compile(hcpass.convert(model), backend="hcpass")``.

    python benchmarks/compile_time.py                  # 4 and 8 layers, C = 128, n = 4
    python benchmarks/compile_time.py --layers 4

Each measurement runs in its own process with a fresh Inductor cache directory, so nothing
(Dynamo, AOTAutograd, FX graph or C++ caches) is warm. Plain and hcpass alternate per layer
count, so a loaded machine slows both alike: compare the ratios. Besides wall time, the CPU
time of the first step across the child's whole process tree (Inductor's compile workers and
the compilers they run included; the steadier figure on a shared machine): the parent's
children rusage over the run minus what the child had spent before the step. Also reported:
the extra seconds per added layer of each, and Dynamo's per-phase compile-time totals
(``torch._dynamo.utils.compilation_time_metrics``). Results go to
benchmarks/results/<device>-<date>.json (section "compile_time").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent

# Run in the child: build, (convert), compile, time the first step, print JSON.
CHILD = """
import json, resource, sys, time
import torch
sys.path.insert(0, {here!r})
import gpt, hcpass
torch.manual_seed(0)
ids, targets = gpt.batch({batch}, {seq})
model = gpt.model({dim}, {layers}, {heads}, {seq})
if {converted}:
    model = torch.compile(hcpass.convert(model, (ids,), streams={streams}), backend="hcpass")
else:
    model = torch.compile(model)
usage = resource.getrusage(resource.RUSAGE_SELF)
setup_cpu = usage.ru_utime + usage.ru_stime
start = time.perf_counter()
gpt.loss(model, ids, targets).backward()
first = time.perf_counter() - start
phases = {{k: round(sum(v), 2) for k, v in
          getattr(torch._dynamo.utils, "compilation_time_metrics", {{}}).items()}}
print("RESULT" + json.dumps({{"first_step_s": first, "setup_cpu_s": setup_cpu, "phases": phases}}))
"""


def first_step(args: argparse.Namespace, layers: int, converted: bool) -> dict:
    code = CHILD.format(
        here=str(HERE),
        batch=args.batch,
        seq=args.seq,
        dim=args.dim,
        layers=layers,
        heads=args.heads,
        streams=args.streams,
        converted=converted,
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        before = _children_cpu_s()
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        tree = _children_cpu_s() - before
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    result = json.loads(line.removeprefix("RESULT"))
    result["first_step_cpu_s"] = tree - result.pop("setup_cpu_s")
    return result


def _children_cpu_s() -> float:
    """User + system seconds of every finished child process tree (waited for) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--streams", type=int, default=4)
    args = parser.parse_args()

    results, rows = {}, []
    for layers in args.layers:
        plain = first_step(args, layers, converted=False)
        hc = first_step(args, layers, converted=True)
        ratio = hc["first_step_s"] / plain["first_step_s"]
        cpu_ratio = hc["first_step_cpu_s"] / plain["first_step_cpu_s"]
        results[layers] = {"plain": plain, "hcpass": hc, "ratio": ratio, "cpu_ratio": cpu_ratio}
        rows.append(
            [
                layers,
                f"{plain['first_step_s']:.1f}",
                f"{hc['first_step_s']:.1f}",
                f"{ratio:.2f}x",
                f"{plain['first_step_cpu_s']:.1f}",
                f"{hc['first_step_cpu_s']:.1f}",
                f"{cpu_ratio:.2f}x",
            ]
        )
        print(f"layers={layers}: {json.dumps(results[layers])}", flush=True)
    header = ["layers", "plain s", "hcpass s", "ratio", "plain CPU s", "hcpass CPU s", "CPU ratio"]
    common.print_table(header, rows)
    if len(args.layers) >= 2:
        lo, hi = min(args.layers), max(args.layers)
        for key, name in (("first_step_s", "per_layer_s"), ("first_step_cpu_s", "per_layer_cpu_s")):
            per = {
                v: (results[hi][v][key] - results[lo][v][key]) / (hi - lo)
                for v in ("plain", "hcpass")
            }
            print(f"{name}: plain {per['plain']:.1f}, hcpass {per['hcpass']:.1f}")
            results[name] = per
    path = common.write_results("compile_time", {"config": vars(args), "results": results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
