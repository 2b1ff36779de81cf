"""Mixer-op benchmark: hcpass's generated Triton kernels against the alternatives.

    python benchmarks/mixer.py                  # tokens 16 x 2048, C 1024..7168, n 2, 4, 8
    python benchmarks/mixer.py --n 4 --C 4096   # one configuration
    TRITON_INTERPRET=1 python benchmarks/mixer.py --dry-run   # CPU, one tiny configuration

For each (n, C), bf16 streams, sinkhorn manifold (20 iterations): forward and backward of
each op (coeffs, pre, post_res), of the boundary between two sites (post_res of site l, then
coeffs and pre of site l+1: one fused op in hcpass, the three ops elsewhere), and forward +
backward of the whole mixer (coeffs -> pre, post_res with an independent branch output y),
timed with triton.testing.do_bench
(warmup, median). Backward times are `torch.autograd.grad` over a retained graph, so every
column is measured through the same autograd path a training step takes.

Columns, side by side:
- hcpass: the ``hcpass::`` ops with the generated kernels registered for CUDA;
- eager: the plain-PyTorch reference (hcpass.ops.reference) under autograd;
- inductor: torch.compile of the reference functions (default Inductor);
- liger: Liger-Kernel's mHC ops (liger_kernel.ops.mhc, token-major layout), n/a if absent.

"bound" is the memory-traffic lower bound: the bytes the op must move (each input read
once, each output written once) over the measured device copy bandwidth; GB/s is those
bytes over hcpass's time, and "x bound" hcpass's time over the bound. Results go to
benchmarks/results/<device>-<date>.json (section "mixer"), rewritten after each (n, C), so a
run stopped early (gpu_session.sh's time limits) keeps what it measured.

--dry-run (benchmarks/gpu_session.sh --dry-run, in CI): the same steps on CPU, n = 4,
C = 24, 1 x 7 tokens, the hcpass column's kernels run by Triton's interpreter (the launchers
registered as the ops' CPU kernels), each phase timed once: checks that the script runs, its
numbers mean nothing.
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
from hcpass.manifolds import create
from hcpass.manifolds.base import RMS_EPS
from hcpass.ops import reference

IMPLEMENTATIONS = ("hcpass", "eager", "inductor", "liger")
PHASES = (
    "coeffs fwd",
    "coeffs bwd",
    "pre fwd",
    "pre bwd",
    "post_res fwd",
    "post_res bwd",
    "boundary fwd",
    "boundary bwd",
    "mixer fwd+bwd",
)


@dataclass
class Problem:
    """One (n, C) configuration: stream-major tensors and, for Liger, token-major copies."""

    n: int
    C: int
    spec: str
    iters: int
    x: Tensor  # [n, batch, seq, C] bf16
    y: Tensor  # [batch, seq, C] bf16
    phi: Tensor
    alpha: Tensor
    bias: Tensor
    h_pre: Tensor
    h_post: Tensor
    h_res: Tensor

    @classmethod
    def make(cls, n: int, C: int, batch: int, seq: int, device: str = "cuda") -> Problem:
        torch.manual_seed(0)
        m = create("sinkhorn", n)
        x = torch.randn(n, batch, seq, C, device=device, dtype=torch.bfloat16)
        phi = torch.randn(m.phi_shape(C), device=device) / math.sqrt(n * C)
        alpha = torch.full((3,), 0.5, device=device)
        bias = m.init_bias(0).to(device)
        coefficients = reference.coeffs(x, phi, alpha, bias, m.spec())
        return cls(
            n,
            C,
            m.spec(),
            m.options["sinkhorn_iters"],
            x,
            torch.randn_like(x[0]),
            phi,
            alpha,
            bias,
            *coefficients,
        )

    def token_major(self, t: Tensor) -> Tensor:
        return t.movedim(0, -2).contiguous() if t.shape[0] == self.n and t.dim() == 4 else t


# ---------------------------------------------------------------- implementations
@dataclass
class Implementation:
    """The three forward ops with one signature (autograd gives the backward), and the
    site boundary: ``(x, y, h_post, h_res, phi, alpha, bias) -> (X', H_pre', H_post',
    H_res', u')``, by default the three ops in sequence."""

    coeffs: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
    pre: Callable[[Tensor, Tensor], Tensor]
    post_res: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
    token_major: bool = False
    boundary: Callable[..., tuple[Tensor, ...]] | None = None

    def __post_init__(self) -> None:
        if self.boundary is None:
            self.boundary = self.unfused_boundary

    def unfused_boundary(self, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, *params):
        out = self.post_res(x, y, h_post, h_res)
        h_pre, h_post_next, h_res_next = self.coeffs(out, *params)
        return out, h_pre, h_post_next, h_res_next, self.pre(out, h_pre)


def hcpass_ops(p: Problem) -> Implementation:
    ops = torch.ops.hcpass  # their CUDA kernels are the generated ones (`import hcpass`)
    return Implementation(
        lambda x, *a: ops.coeffs(x, *a, p.spec),
        ops.pre,
        ops.post_res,
        boundary=lambda *a: ops.post_res_coeffs_pre(*a, p.spec),
    )


def eager_ops(p: Problem) -> Implementation:
    return Implementation(
        lambda x, *a: reference.coeffs(x, *a, p.spec), reference.pre, reference.post_res
    )


def inductor_ops(p: Problem) -> Implementation:
    torch._dynamo.reset()  # fresh compiles per shape, no recompile limit to hit
    return Implementation(
        torch.compile(lambda x, *a: reference.coeffs(x, *a, p.spec)),
        torch.compile(reference.pre),
        torch.compile(reference.post_res),
    )


def liger_ops(p: Problem) -> Implementation:
    from liger_kernel.ops import mhc

    def coeffs(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor) -> tuple[Tensor, ...]:
        # (x, phi, b, alpha_pre, alpha_post, alpha_res, allow_fp32, tmax, rms_eps, pre_eps,
        #  sinkhorn_eps, post_mult)
        return mhc.LigerMHCCoeffsFunction.apply(
            x, phi, bias, alpha[0], alpha[1], alpha[2], False, p.iters, RMS_EPS, 0.0, 1e-6, 2.0
        )

    return Implementation(
        coeffs,
        mhc.LigerMHCPreFunction.apply,
        mhc.LigerMHCPostResFunction.apply,
        token_major=True,
    )


BUILDERS: dict[str, Callable[[Problem], Implementation]] = {
    "hcpass": hcpass_ops,
    "eager": eager_ops,
    "inductor": inductor_ops,
    "liger": liger_ops,
}


# ----------------------------------------------------------------------- measuring
def nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def lower_bounds(p: Problem) -> dict[str, int]:
    """Bytes each phase must move: inputs read once, outputs written once (a gradient has
    its primal's size, so the backward's reads and writes are counted from the primals)."""
    params = (p.phi, p.alpha, p.bias)
    coeffs = (p.h_pre, p.h_post, p.h_res)
    u, out = p.y, p.x  # the shapes of pre's and post_res's outputs
    fwd = {
        "coeffs": nbytes(p.x, *params, *coeffs),
        "pre": nbytes(p.x, p.h_pre, u),
        "post_res": nbytes(p.x, p.y, p.h_post, p.h_res, out),
    }
    bwd = {
        "coeffs": nbytes(*coeffs, p.x, *params) + nbytes(p.x, *params),
        "pre": nbytes(u, p.x, p.h_pre) + nbytes(p.x, p.h_pre),
        "post_res": nbytes(out, p.x, p.y, p.h_post, p.h_res) + nbytes(p.x, p.y, p.h_post, p.h_res),
    }
    boundary_in = (p.x, p.y, p.h_post, p.h_res, *params)
    boundary_out = (out, *coeffs, u)
    fwd["boundary"] = nbytes(*boundary_in, *boundary_out)
    bwd["boundary"] = nbytes(*boundary_out, *boundary_in) + nbytes(*boundary_in)
    mixer_fwd = nbytes(p.x, p.y, *params, u, out)
    mixer_bwd = nbytes(u, out, p.x, p.y, *params) + nbytes(p.x, p.y, *params)
    bounds = {f"{op} fwd": b for op, b in fwd.items()}
    bounds.update({f"{op} bwd": b for op, b in bwd.items()})
    bounds["mixer fwd+bwd"] = mixer_fwd + mixer_bwd
    return bounds


def leaves(*tensors: Tensor) -> list[Tensor]:
    return [t.detach().requires_grad_() for t in tensors]


def as_tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def time_forward_backward(fn: Callable[..., object], args: list[Tensor]) -> tuple[float, float]:
    """(forward ms, backward ms) of `fn(*args)`; the backward over a retained graph."""
    forward = common.median_ms(lambda: fn(*args))
    outs = as_tuple(fn(*args))
    grads = [torch.randn_like(o) for o in outs]
    backward = common.median_ms(lambda: torch.autograd.grad(outs, args, grads, retain_graph=True))
    return forward, backward


def measure(impl: Implementation, p: Problem) -> dict[str, float]:
    layout = p.token_major if impl.token_major else (lambda t: t)
    x, y = layout(p.x), p.y
    times: dict[str, float] = {}
    params = (p.phi, p.alpha, p.bias)
    cases = {
        "coeffs": (impl.coeffs, leaves(x, *params)),
        "pre": (impl.pre, leaves(x, p.h_pre)),
        "post_res": (impl.post_res, leaves(x, y, p.h_post, p.h_res)),
        "boundary": (impl.boundary, leaves(x, y, p.h_post, p.h_res, *params)),
    }
    for op, (fn, args) in cases.items():
        times[f"{op} fwd"], times[f"{op} bwd"] = time_forward_backward(fn, args)

    inputs = leaves(x, y, *params)
    outs = as_tuple(mixer(impl, *inputs))
    grads = [torch.randn_like(o) for o in outs]

    def step() -> None:
        torch.autograd.grad(mixer(impl, *inputs), inputs, grads)

    times["mixer fwd+bwd"] = common.median_ms(step)
    return times


def mixer(
    impl: Implementation, x: Tensor, y: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor]:
    """One mixer site: the branch input u and the new stream state (y stands in for the
    branch output, so the branch itself is not timed)."""
    h_pre, h_post, h_res = impl.coeffs(x, phi, alpha, bias)
    return impl.pre(x, h_pre), impl.post_res(x, y, h_post, h_res)


def run_column(name: str, p: Problem) -> common.Times:
    """Times of every phase for one implementation (`common.run_column`: a failure fills
    the column with the reason; Liger-Kernel is optional)."""
    return common.run_column(
        lambda: measure(BUILDERS[name](p), p), PHASES, optional=name == "liger"
    )


def report(p: Problem, columns: dict[str, common.Times], bandwidth: float) -> list[dict]:
    title = f"n={p.n} C={p.C} tokens={p.x[0].numel() // p.C} bf16"
    keys = {"n": p.n, "C": p.C}
    return common.print_against_bound(title, PHASES, lower_bounds(p), columns, bandwidth, keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--C", type=int, nargs="+", default=[1024, 2048, 4096, 7168])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny shapes")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        codegen.register_interpreted_cpu_kernels()
        args.n, args.C, args.batch, args.seq = [4], [24], 1, 7
    else:
        common.require_cuda("benchmarks/mixer.py")

    bandwidth = common.copy_bandwidth_gbs(1 << 20 if args.dry_run else 1 << 30, device)
    print(f"{common.device_name()}: device copy bandwidth {bandwidth:.0f} GB/s")
    records = []
    for C in args.C:
        for n in args.n:
            p = Problem.make(n, C, args.batch, args.seq, device)
            columns = {name: run_column(name, p) for name in args.impl}
            records += report(p, columns, bandwidth)
            path = common.write_results(
                "mixer",
                {
                    "copy_bandwidth_gbs": bandwidth,
                    "batch": args.batch,
                    "seq": args.seq,
                    "dtype": "bfloat16",
                    "manifold": "sinkhorn",
                    "dry_run": args.dry_run,
                    "rows": records,
                },
            )
            if args.dry_run:
                common.require_measured(columns)
            del p
            gc.collect()
            torch.cuda.empty_cache()
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
