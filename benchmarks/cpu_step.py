"""CPU training-step benchmark: plain vs converted (hcpass.convert, n streams), eager and
compiled, side by side in one process.

    python benchmarks/cpu_step.py                     # C = 128, 4 layers, n = 4, B = 8, T = 128
    python benchmarks/cpu_step.py --skip-compiled     # eager only (no compile wait)
    python benchmarks/cpu_step.py --family attnres --block-size 4   # Block AttnRes

A step is forward, cross-entropy, backward and an AdamW step. Variants: "eager" (plain
model), "eager converted", "inductor" (torch.compile of the plain model) and "hcpass"
(torch.compile(converted, backend="hcpass")). Reported: median step time over --steps
steps after --warmup (the compiles happen in the warm-up) and each converted variant's
ratio to its plain one. Results go to benchmarks/results/<device>-<date>.json (section
"cpu_step").
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import gpt
import torch
from torch import nn

import hcpass


def build(variant: str, args: argparse.Namespace, ids: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = gpt.model(args.dim, args.layers, args.heads, args.seq)
    if variant in ("eager converted", "hcpass"):
        if args.family == "attnres":
            options = {"family": "attnres", "block_size": args.block_size}
        else:
            options = {"streams": args.streams, "manifold": args.manifold}
        model = hcpass.convert(model, (ids,), **options)
    if variant == "inductor":
        return torch.compile(model)
    if variant == "hcpass":
        return torch.compile(model, backend="hcpass")
    return model


def measure(variant: str, args: argparse.Namespace) -> float:
    ids, targets = gpt.batch(args.batch, args.seq)
    model = build(variant, args, ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        gpt.loss(model, ids, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--manifold", default="sinkhorn")
    parser.add_argument("--family", default="hyper-connections", choices=hcpass.FAMILIES)
    parser.add_argument("--block-size", type=int, default=None, help="attnres (None: full)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-compiled", action="store_true")
    args = parser.parse_args()

    pairs = [("eager", "eager converted")]
    if not args.skip_compiled:
        pairs.append(("inductor", "hcpass"))
    rows, results = [], {}
    for plain, converted in pairs:
        plain_ms, converted_ms = measure(plain, args), measure(converted, args)
        results[plain] = {"step_ms": plain_ms}
        results[converted] = {"step_ms": converted_ms, "ratio": converted_ms / plain_ms}
        rows.append(
            [
                plain,
                f"{plain_ms:.1f}",
                converted,
                f"{converted_ms:.1f}",
                f"{converted_ms / plain_ms:.2f}x",
            ]
        )
    common.print_table(["plain", "ms", "converted", "ms", "ratio"], rows)
    section = "cpu_step" if args.family == "hyper-connections" else f"cpu_step_{args.family}"
    path = common.write_results(section, {"config": vars(args), "results": results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
