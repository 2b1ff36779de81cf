"""Attention Residuals benchmark: hcpass's kernels against a plain-PyTorch two-phase version.

    python benchmarks/attnres.py                     # 16 x 2048 tokens, C 1024..4096, S 2..16
    python benchmarks/attnres.py --C 4096 --S 4 16   # some configurations
    TRITON_INTERPRET=1 python benchmarks/attnres.py --dry-run   # CPU, one tiny configuration

One block of Block Attention Residuals (arXiv 2603.15031; the math is in
hcpass/ops/attnres/reference.py) with S sites: site s attends over depth with its query
``w_s [C]``, over the n completed blocks ``b_1..b_n [tokens, C]`` that all S sites share and
over its own partial block ``p_s`` (the sum of the block's branch outputs so far),
``h_s = sum_i softmax_i(r_i <w_s, v_i>) v_i`` over ``v = (b_1, ..., b_n, p_s)``, r_i the
inverse RMS of v_i. bf16 values, fp32 queries, fp32 accumulation. Phases, timed with
triton.testing.do_bench (warmup, median), the inputs requiring grad as in training:
- "block fwd": the S outputs;
- "block fwd+bwd": the outputs and ``torch.autograd.grad`` of random output gradients
  with respect to every block, partial block and query.

Columns, side by side:
- hcpass: ``hcpass::attnres`` once per site, what a converted model calls (its CUDA kernels
  are the generated ones of codegen/attnres.py: phase 1 with the site's one query, phase 2,
  and the ``attnres_backward`` kernel);
- hcpass phases: phase 1 once for the block's S queries (``hcpass::attnres_blocks``: one
  pass over the blocks for all S), then one merge per site (``hcpass::attnres_merge``): the
  paper's batching, what a Block AttnRes model compiled with ``backend="hcpass"`` runs on
  CUDA; the backward through the ops' autograd, their backward kernels
  (``attnres_merge_backward`` per site, then ``attnres_blocks_backward`` once for the S
  queries);
- eager: `two_phase` below, plain PyTorch: phase 1 the S queries against the stacked
  completed blocks with online-softmax statistics (max m, sum l, normalised partial output
  o), phase 2 each site's merge with its partial block; autograd for the backward;
- inductor: ``torch.compile(two_phase)`` (default Inductor, fresh per configuration).

Every column's outputs are checked against the reference (`reference.attnres` per site)
before they are timed: a column that computes other math is reported as an error, never
timed. `check_two_phase` holds `two_phase` to the reference in fp32 (1e-5) first.

"bound" is the memory-traffic lower bound: each input read once, each output written once
(forward: the blocks, the partial blocks and the queries in, the S outputs out; the backward
reads the output gradients and the inputs and writes the inputs' gradients), over the
measured device copy bandwidth; GB/s is those bytes over hcpass's time, "x bound" hcpass's
time over the bound. Results go to benchmarks/results/<device>-<date>.json (section
"attnres"), rewritten after each configuration.

--dry-run (benchmarks/gpu_session.sh --dry-run, in CI): the same steps on CPU, C = 24,
2 blocks, S = 3, 1 x 7 tokens, the hcpass columns' kernels run by Triton's interpreter (the
launchers registered as the ops' CPU kernels), each phase timed once: checks that the script
runs and that every column computes the reference's math; its times mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

import common
import torch
from torch import Tensor

from hcpass import codegen
from hcpass.ops.attnres import reference
from hcpass.rewrite.attnres import KEY_EPS

IMPLEMENTATIONS = ("hcpass", "hcpass_phases", "eager", "inductor")
PHASES = ("block fwd", "block fwd+bwd")
# Each column's bf16 outputs against the reference's: one bf16 rounding (2^-8 relative) after
# fp32 sums in another order, as the kernel tests' GPU bound.
OUTPUT_TOL = 2e-2
# `two_phase` against the reference in fp32: the same math, sums in another order.
MATH_TOL = 1e-5

Block = Callable[[list[Tensor], list[Tensor], Tensor], list[Tensor]]


# -------------------------------------------------------------------- the baseline
def two_phase(
    blocks: list[Tensor], partials: list[Tensor], queries: Tensor, eps: float = KEY_EPS
) -> list[Tensor]:
    """The S outputs ``h_s`` of a block in plain PyTorch, the paper's two phases.

    Phase 1: the S queries ``[S, C]`` against the n completed blocks ``[*pos, C]``, stacked:
    logits ``s_j = r_j <w, b_j>`` ``[n, *pos, S]``, their max ``m``, ``l = sum_j exp(s_j - m)``
    and the normalised partial output ``o = sum_j exp(s_j - m) b_j / l`` ``[S, *pos, C]``.
    Phase 2, per site: the partial block's logit ``s_p``, ``m' = max(m, s_p)``,
    ``a = l exp(m - m')``, ``b = exp(s_p - m')``, ``h = (a o + b p) / (a + b)``, in p's dtype.
    """
    keys = torch.stack(blocks).float()
    w = queries.float()
    inv_rms = torch.rsqrt(keys.square().mean(-1, keepdim=True) + eps)
    logits = inv_rms * (keys @ w.T)  # [n, *pos, S]
    m = logits.amax(0)
    e = torch.exp(logits - m)
    l = e.sum(0)  # noqa: E741
    o = torch.einsum("n...s,n...c->s...c", e / l, keys)
    outputs = []
    for s, partial in enumerate(partials):
        p = partial.float()
        logit = torch.rsqrt(p.square().mean(-1) + eps) * (p @ w[s])
        top = torch.maximum(m[..., s], logit)
        a = (l[..., s] * torch.exp(m[..., s] - top)).unsqueeze(-1)
        b = torch.exp(logit - top).unsqueeze(-1)
        outputs.append(((a * o[s] + b * p) / (a + b)).to(partial.dtype))
    return outputs


def reference_block(blocks: list[Tensor], partials: list[Tensor], queries: Tensor) -> list[Tensor]:
    """hcpass's reference, one site at a time."""
    return [reference.attnres([*blocks, p], queries[s], KEY_EPS) for s, p in enumerate(partials)]


def check_two_phase() -> None:
    """`two_phase` computes the reference's math: fp32, odd sizes, logits of order one. On
    CPU, wherever the benchmark runs: the math does not depend on the device (and a GPU's
    fp32 matmuls may run in TF32); each column's outputs are checked on the device too."""
    torch.manual_seed(1)
    blocks = [torch.randn(2, 5, 40) * (j + 1) for j in range(3)]
    partials = [torch.randn(2, 5, 40) for _ in range(4)]
    queries = torch.randn(4, 40) / math.sqrt(40)
    for got, want in zip(
        two_phase(blocks, partials, queries),
        reference_block(blocks, partials, queries),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=MATH_TOL, atol=MATH_TOL)


# -------------------------------------------------------------------------- problem
@dataclass
class Problem:
    """One configuration: n completed blocks and S partial blocks ``[batch, seq, C]`` bf16,
    S queries ``[S, C]`` fp32 (logits of order one: a softmax that is neither uniform nor
    one-hot)."""

    C: int
    n: int
    S: int
    blocks: list[Tensor]
    partials: list[Tensor]
    queries: Tensor

    @classmethod
    def make(cls, C: int, n: int, S: int, batch: int, seq: int, device: str) -> Problem:
        torch.manual_seed(0)

        def value() -> Tensor:
            return torch.randn(batch, seq, C, device=device, dtype=torch.bfloat16)

        blocks = [value() for _ in range(n)]
        partials = [value() for _ in range(S)]
        return cls(C, n, S, blocks, partials, torch.randn(S, C, device=device) / math.sqrt(C))

    @property
    def tokens(self) -> int:
        return self.blocks[0].numel() // self.C


def nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def lower_bounds(p: Problem) -> dict[str, int]:
    """Bytes each phase must move: inputs read once, outputs written once (a gradient has
    its primal's size)."""
    inputs = nbytes(*p.blocks, *p.partials, p.queries)
    outputs = nbytes(*p.partials)  # the S outputs have the partial blocks' shape and dtype
    forward = inputs + outputs
    backward = outputs + inputs + inputs  # reads grads and inputs, writes the inputs' grads
    return {"block fwd": forward, "block fwd+bwd": forward + backward}


# --------------------------------------------------------------------------- columns
def hcpass_op(blocks: list[Tensor], partials: list[Tensor], queries: Tensor) -> list[Tensor]:
    ops = torch.ops.hcpass  # its CUDA kernels are the generated ones (`import hcpass`)
    return [ops.attnres([*blocks, p], queries[s], KEY_EPS) for s, p in enumerate(partials)]


def hcpass_phases(blocks: list[Tensor], partials: list[Tensor], queries: Tensor) -> list[Tensor]:
    ops = torch.ops.hcpass  # CUDA kernels and their backward: the generated ones
    o, lse = ops.attnres_blocks(blocks, queries, KEY_EPS)
    return [ops.attnres_merge(o[s], lse[s], p, queries[s], KEY_EPS) for s, p in enumerate(partials)]


def builders() -> dict[str, Callable[[], Block]]:
    def inductor() -> Block:
        torch._dynamo.reset()  # fresh compiles per configuration, no recompile limit to hit
        return torch.compile(two_phase)

    return {
        "hcpass": lambda: hcpass_op,
        "hcpass_phases": lambda: hcpass_phases,
        "eager": lambda: two_phase,
        "inductor": inductor,
    }


# ------------------------------------------------------------------------- measuring
def measure(name: str, block: Block, p: Problem, want: list[Tensor]) -> dict[str, float | str]:
    """Check the outputs against `want` (the reference's), then time both phases."""
    leaves = [t.detach().requires_grad_() for t in (*p.blocks, *p.partials, p.queries)]
    blocks, partials, queries = leaves[: p.n], leaves[p.n : -1], leaves[-1]

    def forward() -> list[Tensor]:
        return block(blocks, partials, queries)

    for got, expected in zip(forward(), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=OUTPUT_TOL, atol=OUTPUT_TOL)
    times: dict[str, float | str] = {"block fwd": common.median_ms(forward)}
    grads = [torch.randn_like(h) for h in want]

    def step() -> None:
        torch.autograd.grad(forward(), leaves, grads)

    times["block fwd+bwd"] = common.median_ms(step)
    return times


def run_column(name: str, p: Problem, want: list[Tensor]) -> common.Times:
    """Times of both phases for one implementation (`common.run_column`: a failure fills
    the column with the reason; an output off the reference is one)."""
    return common.run_column(lambda: measure(name, builders()[name](), p, want), PHASES)


# ---------------------------------------------------------------------------- report
def report(p: Problem, columns: dict[str, common.Times], bandwidth: float) -> list[dict]:
    title = f"C={p.C} blocks={p.n} S={p.S} tokens={p.tokens} bf16"
    keys = {"C": p.C, "blocks": p.n, "sites": p.S}
    return common.print_against_bound(title, PHASES, lower_bounds(p), columns, bandwidth, keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--C", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--S", type=int, nargs="+", default=[2, 4, 8, 16], help="sites a block")
    parser.add_argument("--blocks", type=int, default=8, help="completed blocks")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny shapes")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        codegen.register_interpreted_cpu_kernels()
        args.C, args.S, args.blocks, args.batch, args.seq = [24], [3], 2, 1, 7
    else:
        common.require_cuda("benchmarks/attnres.py")

    check_two_phase()
    bandwidth = common.copy_bandwidth_gbs(1 << 20 if args.dry_run else 1 << 30, device)
    print(f"{common.device_name()}: device copy bandwidth {bandwidth:.0f} GB/s")
    records: list[dict] = []
    for C in args.C:
        for S in args.S:
            p = Problem.make(C, args.blocks, S, args.batch, args.seq, device)
            with torch.no_grad():
                want = reference_block(p.blocks, p.partials, p.queries)
            columns = {name: run_column(name, p, want) for name in args.impl}
            records += report(p, columns, bandwidth)
            path = common.write_results(
                "attnres",
                {
                    "copy_bandwidth_gbs": bandwidth,
                    "batch": args.batch,
                    "seq": args.seq,
                    "dtype": "bfloat16",
                    "eps": KEY_EPS,
                    "dry_run": args.dry_run,
                    "rows": records,
                },
            )
            if args.dry_run:
                common.require_measured(columns)
            del p, want
            gc.collect()
            torch.cuda.empty_cache()
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
