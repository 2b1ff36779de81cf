"""Cold compile time on CPU: the first training step (forward + backward) of the GPT in
gpt.py, plain ``torch.compile`` vs ``torch.compile(hcpass.convert(model), backend="hcpass")``.

    python benchmarks/compile_time.py                  # 4 and 8 layers, C = 128, n = 4
    python benchmarks/compile_time.py --layers 4

Each measurement runs in its own process with a fresh Inductor cache directory, so nothing
(Dynamo, AOTAutograd, FX graph or C++ caches) is warm. Plain and hcpass alternate per layer
count, so a loaded machine slows both alike: compare the ratios. Also reported: the extra
seconds per added layer of each, and Dynamo's per-phase compile-time totals
(``torch._dynamo.utils.compilation_time_metrics``). Results go to
benchmarks/results/<device>-<date>.json (section "compile_time").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent

# Run in the child: build, (convert), compile, time the first step, print JSON.
CHILD = """
import json, sys, time
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
start = time.perf_counter()
gpt.loss(model, ids, targets).backward()
first = time.perf_counter() - start
phases = {{k: round(sum(v), 2) for k, v in
          getattr(torch._dynamo.utils, "compilation_time_metrics", {{}}).items()}}
print("RESULT" + json.dumps({{"first_step_s": first, "phases": phases}}))
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
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))


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
        results[layers] = {"plain": plain, "hcpass": hc, "ratio": ratio}
        rows.append(
            [layers, f"{plain['first_step_s']:.1f}", f"{hc['first_step_s']:.1f}", f"{ratio:.2f}x"]
        )
        print(f"layers={layers}: {json.dumps(results[layers])}", flush=True)
    common.print_table(["layers", "plain s", "hcpass s", "ratio"], rows)
    if len(args.layers) >= 2:
        lo, hi = min(args.layers), max(args.layers)
        per = {
            v: (results[hi][v]["first_step_s"] - results[lo][v]["first_step_s"]) / (hi - lo)
            for v in ("plain", "hcpass")
        }
        print(f"added seconds per layer: plain {per['plain']:.1f}, hcpass {per['hcpass']:.1f}")
        results["per_layer_s"] = per
    path = common.write_results("compile_time", {"config": vars(args), "results": results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
