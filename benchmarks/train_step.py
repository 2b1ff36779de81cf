"""Training-step benchmark: a GPT or a Llama-style decoder, plain vs converted by hcpass.

    python benchmarks/train_step.py                       # gpt-100m (98.4M), 16 x 1024 tokens
    python benchmarks/train_step.py --preset llama-2048   # C = 2048, 8 layers (542M), 4 x 2048
    python benchmarks/train_step.py --preset llama-2048 --dim 4096 --layers 4
    TRITON_INTERPRET=1 python benchmarks/train_step.py --dry-run   # CPU, a tiny model

Presets (`PRESETS`; any flag given overrides the preset's value):
- gpt-100m (the default, what benchmarks/gpu_session.sh runs): GPT-2 small's shape (12
  layers of C = 768, 12 heads, 1024 positions) with an 8K vocabulary, as the demo's GPT
  (hcpass.tools.demo.gpt: learned positions, LayerNorm, a GELU MLP, biases, an untied head):
  98.4M parameters plain;
- llama-2048: the Llama-style decoder below (RMSNorm, rotary positions, SwiGLU, no biases)
  at C = 2048, 8 layers, a 32K vocabulary: 542M parameters.

Variants, each a fresh model from the same seed, bf16 weights, fused AdamW:
- eager: the plain model;
- inductor: ``torch.compile(model)``;
- hcpass: ``hcpass.convert(model, (ids,), streams=4)`` then
  ``torch.compile(converted, backend="hcpass")`` (mHC mixers, generated Triton kernels).

A step is forward, cross-entropy, backward and the optimizer step. Reported: median step
time over --steps steps after --warmup steps (CUDA events), tokens/s, peak memory
allocated during the timed steps and the parameters (the converted model's include its
mixers). Results go to benchmarks/results/<device>-<date>.json (section "train_step"),
rewritten after each variant.

--dry-run (benchmarks/gpu_session.sh --dry-run, in CI): the same steps on CPU with a tiny
model of the preset's kind (C = 32, 2 layers, 1 x 16 tokens), one warmup and one timed step:
checks that the script runs, its numbers mean nothing. On CPU tensors the hcpass backend
lowers for the CPU (tests/lowering/test_cuda_path.py runs the CUDA lowering on CPU).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import common
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hcpass
from hcpass.tools.demo.gpt import GPT, GPTConfig

VARIANTS = ("eager", "inductor", "hcpass")
PRESETS: dict[str, dict[str, int | str]] = {
    "gpt-100m": dict(model="gpt", dim=768, layers=12, heads=12, vocab=8192, batch=16, seq=1024),
    "llama-2048": dict(model="llama", dim=2048, layers=8, heads=16, vocab=32000, batch=4, seq=2048),
}
DRY_RUN = dict(dim=32, layers=2, heads=2, vocab=64, batch=1, seq=16, warmup=1, steps=1)


# --------------------------------------------------------------------------- model
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rotary(seq: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    freqs = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, -1).transpose(1, 3).unbind(2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attended.transpose(1, 2).reshape(batch, seq, dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm decoder block: two residual adds, the sites hcpass rewrites."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        hidden = 256 * ((8 * dim // 3 + 255) // 256)  # SwiGLU width, as in Llama
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        cos, sin = rotary(seq, dim // heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        return self.head(self.norm(x))


# ----------------------------------------------------------------------- benchmark
def plain_model(args: argparse.Namespace) -> nn.Module:
    if args.model == "gpt":
        config = GPTConfig(args.vocab, args.seq, args.dim, args.layers, args.heads)
        return GPT(config)
    return Llama(args.vocab, args.dim, args.layers, args.heads, args.seq)


def build(variant: str, args: argparse.Namespace, ids: Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = plain_model(args).to(device=ids.device, dtype=torch.bfloat16)
    if variant == "inductor":
        return torch.compile(model)
    if variant == "hcpass":
        converted = hcpass.convert(model, (ids,), streams=4)
        return torch.compile(converted, backend="hcpass")
    return model


def measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    device = "cpu" if args.dry_run else "cuda"
    ids = torch.randint(args.vocab, (args.batch, args.seq), device=device)
    targets = torch.randint(args.vocab, (args.batch, args.seq), device=device)
    model = build(variant, args, ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        logits = model(ids)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.view(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):  # includes the compiles
        step()
    if args.dry_run:
        times = [wall_clock(step) for _ in range(args.steps)]
        peak = float("nan")
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = [timed(step) for _ in range(args.steps)]
        peak = torch.cuda.max_memory_allocated() / 2**30
    return {
        "step_ms": statistics.median(times),
        "tokens_per_s": args.batch * args.seq / statistics.median(times) * 1e3,
        "peak_memory_gib": peak,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def timed(fn: Callable[[], None]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def wall_clock(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="gpt-100m")
    parser.add_argument("--model", choices=["gpt", "llama"], help="default: the preset's")
    for size in ("dim", "layers", "heads", "vocab", "batch", "seq"):
        parser.add_argument(f"--{size}", type=int, help="default: the preset's")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dry-run", action="store_true", help="CPU, a tiny model, one step")
    args = parser.parse_args()
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.dry_run:
        vars(args).update(DRY_RUN)
    else:
        common.require_cuda("benchmarks/train_step.py")
    with torch.device("meta"):
        parameters = sum(p.numel() for p in plain_model(args).parameters())
    kind = "GPT" if args.model == "gpt" else "Llama-style"
    print(
        f"{common.device_name()}: {kind} C={args.dim}, {args.layers} layers, {args.heads} "
        f"heads, vocab {args.vocab}, {args.batch} x {args.seq} tokens, bf16: "
        f"{parameters / 1e6:.1f}M parameters"
    )

    results: dict[str, dict[str, float] | str] = {}
    for variant in args.variant:
        try:
            results[variant] = measure(variant, args)
        except torch.OutOfMemoryError:
            results[variant] = "oom"
        finally:
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()
        path = common.write_results(
            "train_step", {"config": vars(args), "parameters": parameters, "variants": results}
        )

    rows = []
    for variant, r in results.items():
        if isinstance(r, str):
            rows.append([variant, r, "-", "-", "-"])
            continue
        rows.append(
            [
                variant,
                f"{r['step_ms']:.1f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['peak_memory_gib']:.2f}",
                f"{r['parameters'] / 1e6:.1f}",
            ]
        )
    common.print_table(["variant", "step ms", "tokens/s", "peak GiB", "params M"], rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
