"""Decoding benchmark: HF ``generate`` (greedy, KV cache, batch 1) of a small GPT-2, plain
against converted (hyper-connections and Attention Residuals), eager and compiled.

    python benchmarks/decode.py                       # 4 layers, C = 128, 4 heads, 64 tokens
    python benchmarks/decode.py --skip-compiled       # eager only (no compile wait)
    python benchmarks/decode.py --profile hyper-connections   # cProfile of one eager generate

Variants: "plain" (the model), "hyper-connections" (``hcpass.convert``, default options:
Sinkhorn, n = 4, dynamic mixers), "attnres" (``family="attnres"``), each eager and compiled
(``model.forward = torch.compile(model.forward, backend=...)``, plain with
``backend="inductor"``, converted with ``backend="hcpass"``: ``generate`` on
``torch.compile(model)`` would run the uncompiled model). Every variant is
built fresh in this process; its first ``generate`` call (captures and compiles included)
is timed on its own, then --rounds rounds of steady calls run interleaved across the
variants (the machine is shared: each round sees the same load), one thread
(``torch.set_num_threads(1)``). Reported: first-call and steady tokens/s (fastest and
median round), the fastest round's wall and CPU time per token and their ratios to plain,
and Dynamo's graph compiles per generated token after the first call
(``torch._dynamo.utils.counters["stats"]["unique_graphs"]``: 0 means no recompile per
token). Results go to benchmarks/results/<device>-<date>.json (section "decode").
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable

import common
import torch
from torch import nn
from torch._dynamo.utils import counters

import hcpass

FAMILIES = ("plain", "hyper-connections", "attnres")


def gpt2(args: argparse.Namespace) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = GPT2Config(
        n_layer=args.layers,
        n_embd=args.dim,
        n_head=args.heads,
        vocab_size=args.vocab,
        n_positions=args.prompt + args.tokens,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def build(family: str, compiled: bool, args: argparse.Namespace, ids: torch.Tensor) -> nn.Module:
    model = gpt2(args)
    if family != "plain":
        model = hcpass.convert(model, (ids,), family=family)
    if compiled:
        # The forward, not the module: `generate` is the model's own method, and on
        # torch.compile(model) it runs bound to the uncompiled model.
        model.forward = torch.compile(
            model.forward, backend="inductor" if family == "plain" else "hcpass"
        )
    return model


def generator(model: nn.Module, ids: torch.Tensor, tokens: int) -> Callable[[], torch.Tensor]:
    def generate() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(
                ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )

    return generate


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def timed(generate: Callable[[], torch.Tensor]) -> tuple[float, float, int, torch.Tensor]:
    """Wall and CPU seconds of one call (this process's CPU time: the steadier figure on a
    shared machine, where other jobs stretch the wall time), the graphs Dynamo compiled
    during it, and its output."""
    before = graphs_compiled()
    start, start_cpu = time.perf_counter(), time.process_time()
    out = generate()
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return wall, cpu, graphs_compiled() - before, out


def ratio(record: dict, key: str) -> str:
    return f"{record[key]:.2f}x" if key in record else "-"


def profile(family: str, args: argparse.Namespace, ids: torch.Tensor) -> None:
    generate = generator(build(family, False, args, ids), ids, args.tokens)
    generate()
    profiler = cProfile.Profile()
    profiler.runcall(generate)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--prompt", type=int, default=8, help="prompt length")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generate")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-compiled", action="store_true")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--profile", choices=FAMILIES[1:], help="cProfile one eager generate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(1, args.vocab, (1, args.prompt))
    if args.profile:
        profile(args.profile, args, ids)
        return

    variants = [(family, False) for family in args.families]
    if not args.skip_compiled:
        variants += [(family, True) for family in args.families]
    generators, first, first_graphs, outputs = {}, {}, {}, {}
    for variant in variants:
        generators[variant] = generator(build(*variant, args, ids), ids, args.tokens)
        first[variant], _, first_graphs[variant], outputs[variant] = timed(generators[variant])
    walls: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
    cpus: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
    steady_graphs = dict.fromkeys(variants, 0)
    for _ in range(args.rounds):
        for variant in variants:
            wall, cpu, graphs, out = timed(generators[variant])
            if not torch.equal(out, outputs[variant]):
                raise RuntimeError(f"{variant}: greedy output changed between calls")
            walls[variant].append(wall)
            cpus[variant].append(cpu)
            steady_graphs[variant] += graphs

    per_token = lambda seconds: 1e3 * seconds / args.tokens  # noqa: E731
    rows, records = [], []
    for family, compiled in variants:
        variant, plain = (family, compiled), ("plain", compiled)
        record = {
            "family": family,
            "mode": "compiled" if compiled else "eager",
            "first_call_tok_s": args.tokens / first[variant],
            "first_call_graphs": first_graphs[variant],
            "steady_tok_s_fastest": args.tokens / min(walls[variant]),
            "steady_tok_s_median": args.tokens / statistics.median(walls[variant]),
            "ms_per_token_fastest": per_token(min(walls[variant])),
            "cpu_ms_per_token_fastest": per_token(min(cpus[variant])),
            "graphs_per_token_after_first_call": steady_graphs[variant]
            / (args.rounds * args.tokens),
        }
        if plain in walls:
            record["ratio_to_plain"] = min(walls[variant]) / min(walls[plain])
            record["cpu_ratio_to_plain"] = min(cpus[variant]) / min(cpus[plain])
            record["output_equals_plain"] = bool(torch.equal(outputs[variant], outputs[plain]))
        records.append(record)
        rows.append(
            [
                family,
                record["mode"],
                f"{record['first_call_tok_s']:.1f}",
                str(record["first_call_graphs"]),
                f"{record['steady_tok_s_fastest']:.0f}",
                f"{record['steady_tok_s_median']:.0f}",
                f"{record['ms_per_token_fastest']:.2f}",
                ratio(record, "ratio_to_plain"),
                f"{record['cpu_ms_per_token_fastest']:.2f}",
                ratio(record, "cpu_ratio_to_plain"),
                f"{record['graphs_per_token_after_first_call']:.3f}",
            ]
        )
    common.print_table(
        [
            "model",
            "mode",
            "first call tok/s",
            "graphs (first call)",
            "steady tok/s (fastest)",
            "(median)",
            "ms/token",
            "vs plain",
            "CPU ms/token",
            "vs plain (CPU)",
            "graphs/token after",
        ],
        rows,
    )
    settings = {k: v for k, v in vars(args).items() if k not in ("profile", "families")}
    path = common.write_results("decode", {"settings": settings, "variants": records})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
