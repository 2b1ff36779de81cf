"""``hcpass demo``: train a small byte-level GPT on Python's standard library, plain and
converted with several manifolds, and compare them.

Every variant starts from the same initial weights (one initialised model, deep-copied),
sees the same batches in the same order and trains for the same number of steps with the
same optimizer settings; the only difference is `hcpass.convert`. At the end it prints a
table (train loss, held-out loss, ms/step, parameters), says which variants did worse than
the plain model, and writes ``results.json`` and pictures to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hcpass
from hcpass import plot
from hcpass.manifolds.base import INITS

BASELINE = "plain"
# Tried in order; the first registered of EXACT is added to the defaults, so the demo shows
# one manifold whose H_res is exactly doubly stochastic (no Sinkhorn iterations).
DEFAULT_MANIFOLDS = ("sinkhorn", "hc")
EXACT = ("kronecker", "permutation")
TRAIN_LOSS_WINDOW = 20  # the reported train loss is the mean of the last steps' losses


# ----------------------------------------------------------------------------- model
@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 256  # bytes
    context: int = 64
    width: int = 64
    layers: int = 4
    heads: int = 4


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.proj = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class GPT(nn.Module):
    """Pre-norm GPT: its 2 * layers residual adds are what hcpass converts."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        self.apply(self._init)
        # GPT-2: scale the projections that write into the residual stream by depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


# ------------------------------------------------------------------------------ data
def stdlib_files() -> list[Path]:
    """Python's standard library sources in sorted order (installed packages excluded)."""
    paths = sysconfig.get_paths()
    root = Path(paths["stdlib"])
    installed = {Path(paths[k]) for k in ("purelib", "platlib")}
    files = []
    for folder, subfolders, names in os.walk(root):
        # site-packages usually lies inside the stdlib folder: don't descend into it.
        subfolders[:] = [d for d in subfolders if Path(folder, d) not in installed]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    if not files:
        raise RuntimeError(f"no .py files found under {root}")
    return sorted(files)


def load_corpus(max_bytes: int, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """(train, validation) byte tensors drawn from whole stdlib files.

    The file order is a fixed shuffle of the sorted list (independent of --seed: every seed
    sees the same corpus), so the cap samples all of the library rather than its first
    packages alphabetically; validation is a separate set of files, not a slice of ones
    the model trains on."""
    files = stdlib_files()
    random.Random(0).shuffle(files)
    val_bytes = int(max_bytes * val_fraction)
    val: list[bytes] = []
    train: list[bytes] = []
    size_val = size_train = 0
    for f in files:
        data = f.read_bytes()
        if size_val < val_bytes:
            val.append(data)
            size_val += len(data)
        elif size_train < max_bytes - val_bytes:
            train.append(data)
            size_train += len(data)
        else:
            break

    def tensor(chunks: list[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()

    return tensor(train)[: max_bytes - val_bytes], tensor(val)[:val_bytes]


def batch_at(data: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    index = starts[:, None] + torch.arange(context + 1)
    chunk = data[index]
    return chunk[:, :-1], chunk[:, 1:]


# ------------------------------------------------------------------------------ train
@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.1
    eval_batches: int = 16
    streams: int = 4
    init: str | None = None  # None: hcpass.convert's default
    mixer_lr_scale: float = hcpass.training.MIXER_LR_SCALE
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    compile: bool = False
    corpus_bytes: int = 2_000_000


@dataclass
class Result:
    name: str
    manifold: str | None
    params: int
    curve: list[float]
    train_loss: float
    val_loss: float
    ms_per_step: float
    seconds: float  # wall time of the variant: conversion, compilation, training, evaluation
    gain: list[dict[str, float]] = field(default_factory=list)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Fraction of the peak learning rate: linear warmup, then cosine decay to a tenth."""
    warmup = max(1, min(50, cfg.steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, cfg.steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * t))


def make_schedule(model: nn.Module, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """AdamW on `hcpass.param_groups` (weight decay on matrices only, GPT-2 practice; the
    mixers at ``cfg.mixer_lr_scale`` times the learning rate), scheduled by `lr_factor`."""
    groups = hcpass.param_groups(
        model, lr=cfg.lr, weight_decay=cfg.weight_decay, mixer_lr_scale=cfg.mixer_lr_scale
    )
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


class Progress:
    """One status line per variant, redrawn with ``\\r`` on a terminal; on a pipe or log
    file (no ``\\r`` redraw) a line every tenth of the run instead."""

    def __init__(self, name: str, total: int) -> None:
        self.name = name
        self.total = total
        self.stream = sys.stderr  # stdout is for the results table
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, total // 10)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        done = step + 1
        if not self.tty and done % self.every and done != self.total:
            return
        width = 24
        filled = width * done // self.total
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"{self.name:<12} [{bar}] {done:>5}/{self.total}  loss {loss:6.3f}  "
            f"{tokens_per_s / 1000:7.1f}k tok/s"
        )
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def train(
    name: str,
    model: nn.Module,
    run: Callable[[Tensor], Tensor],
    data: tuple[Tensor, Tensor],
    gpt: GPTConfig,
    cfg: TrainConfig,
) -> tuple[list[float], list[float]]:
    """Train `model` (its forward is `run`) and return per-step losses and step times.
    Batches come from a generator seeded with --seed: every variant sees the same ones."""
    train_data, _ = data
    generator = torch.Generator().manual_seed(cfg.seed)
    schedule = make_schedule(model, cfg)
    optimizer = schedule.optimizer
    progress = Progress(name, cfg.steps)
    tokens = cfg.batch * gpt.context
    curve: list[float] = []
    times: list[float] = []
    model.train()
    for step in range(cfg.steps):
        starts = torch.randint(
            0, len(train_data) - gpt.context - 1, (cfg.batch,), generator=generator
        )
        x, y = (t.to(cfg.device) for t in batch_at(train_data, starts, gpt.context))
        begin = time.perf_counter()
        loss = F.cross_entropy(run(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        value = loss.item()  # also waits for the device, so the step time is complete
        times.append(time.perf_counter() - begin)
        curve.append(value)
        progress.update(step, value, tokens / times[-1])
    return curve, times


def validation_batches(
    val: Tensor, gpt: GPTConfig, cfg: TrainConfig
) -> list[tuple[Tensor, Tensor]]:
    """Fixed, evenly spaced held-out batches (the same for every variant)."""
    count = cfg.eval_batches * cfg.batch
    starts = torch.linspace(0, len(val) - gpt.context - 2, count).long()
    return [
        tuple(t.to(cfg.device) for t in batch_at(val, chunk, gpt.context))
        for chunk in starts.split(cfg.batch)
    ]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]]) -> float:
    model.eval()
    total = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches)
    model.train()
    return total / len(batches)


def step_ms(times: list[float]) -> float:
    # Median over the steps after the first few: those include Dynamo capture (and with
    # --compile, Inductor compilation), which a longer run amortises.
    steady = times[3:] if len(times) > 6 else times
    return 1000 * statistics.median(steady)


def run_variant(
    name: str,
    manifold: str | None,
    base: GPT,
    data: tuple[Tensor, Tensor],
    held_out: list[tuple[Tensor, Tensor]],
    cfg: TrainConfig,
) -> tuple[Result, nn.Module]:
    begin = time.perf_counter()
    model: nn.Module = copy.deepcopy(base)
    example = held_out[0][0]
    if manifold is not None:
        options = {} if cfg.init is None else {"init": cfg.init}
        model = hcpass.convert(model, (example,), streams=cfg.streams, manifold=manifold, **options)
    # A fresh Dynamo cache per variant: cached graphs of the previous variant (same GPT
    # class) must not be reused for this one.
    torch._dynamo.reset()
    run: Callable[[Tensor], Tensor] = model
    if cfg.compile:
        run = torch.compile(model, backend="hcpass" if manifold else "inductor")
    curve, times = train(name, model, run, data, base.cfg, cfg)
    # Evaluated through the uncompiled module (same parameters): a no-grad graph would cost
    # another Inductor compile for a handful of batches.
    val_loss = evaluate(model, held_out)
    window = curve[-TRAIN_LOSS_WINDOW:]
    result = Result(
        name=name,
        manifold=manifold,
        params=sum(p.numel() for p in model.parameters()),
        curve=curve,
        train_loss=sum(window) / len(window),
        val_loss=val_loss,
        ms_per_step=step_ms(times),
        seconds=time.perf_counter() - begin,
    )
    return result, model


def compare(
    gpt: GPTConfig, cfg: TrainConfig, manifolds: Sequence[str], data: tuple[Tensor, Tensor]
) -> tuple[list[Result], dict[str, nn.Module], Tensor]:
    """Train the plain model and one converted copy per manifold from the same initial
    weights. Returns the results (plain first), the converted models and the held-out
    batch their mixers are inspected on."""
    held_out = validation_batches(data[1], gpt, cfg)
    torch.manual_seed(cfg.seed)
    base = GPT(gpt).to(cfg.device)
    results: list[Result] = []
    models: dict[str, nn.Module] = {}
    for manifold in [None, *manifolds]:
        name = manifold or BASELINE
        result, model = run_variant(name, manifold, base, data, held_out, cfg)
        if manifold is not None:
            result.gain = hcpass.gain(model, (held_out[0][0],))
            models[name] = model
        results.append(result)
    return results, models, held_out[0][0]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)  # run() may be called in a longer-lived process


# ---------------------------------------------------------------------------- report
def registered_manifolds() -> set[str]:
    """Every registered manifold name and alias, from the labels of `hcpass.manifolds()`
    (``"kronecker (kromhc)"``)."""
    names: set[str] = set()
    for label in hcpass.manifolds():
        name, _, aliases = label.partition(" (")
        names.add(name)
        names.update(aliases.rstrip(")").split(", ") if aliases else ())
    return names


def choose_manifolds(requested: str | None) -> tuple[list[str], list[str]]:
    """(manifolds to run, notes about defaults that are not registered)."""
    registered = registered_manifolds()
    if requested:
        names = [m.strip() for m in requested.split(",") if m.strip()]
        unknown = [m for m in names if m not in registered]
        if unknown:
            valid = ", ".join(sorted(registered))
            raise ValueError(f"unknown manifold(s) {', '.join(unknown)}; registered: {valid}")
        return list(dict.fromkeys(names)), []
    chosen = [m for m in DEFAULT_MANIFOLDS if m in registered]
    notes = [
        f"manifold {m!r} is not registered in this hcpass; skipped"
        for m in DEFAULT_MANIFOLDS
        if m not in registered
    ]
    exact = next((m for m in EXACT if m in registered), None)
    if exact is None:
        notes.append(f"none of the exact manifolds {', '.join(EXACT)} is registered; skipped")
    else:
        chosen.append(exact)
    return chosen, notes


def table(results: Sequence[Result]) -> str:
    header = ("variant", "train loss", "held-out loss", "vs plain", "ms/step", "params")
    base = results[0]
    rows = []
    for r in results:
        delta = "-" if r is base else f"{r.val_loss - base.val_loss:+.4f}"
        rows.append(
            (
                r.name,
                f"{r.train_loss:.4f}",
                f"{r.val_loss:.4f}",
                delta,
                f"{r.ms_per_step:.1f}",
                f"{r.params:,}",
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        return "  ".join(
            [first, *(f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True))]
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def verdicts(results: Sequence[Result]) -> list[str]:
    """One plain sentence per converted variant: better or worse than the baseline."""
    base = results[0]
    lines = []
    for r in results[1:]:
        delta = round(r.val_loss - base.val_loss, 4)  # as printed in the table
        losses = f"{r.val_loss:.4f} vs {base.val_loss:.4f}"
        if delta > 0:
            verdict = f"WORSE than {BASELINE} on held-out loss ({losses}, {delta:+.4f})"
        elif delta < 0:
            verdict = f"better than {BASELINE} on held-out loss ({losses}, {delta:+.4f})"
        else:
            verdict = f"the same held-out loss as {BASELINE} to 4 decimals ({losses})"
        speed = r.ms_per_step / base.ms_per_step
        lines.append(f"{r.name}: {verdict}; {speed:.1f}x the step time of {BASELINE}.")
    return lines


def pictures(
    out: Path,
    results: Sequence[Result],
    models: dict[str, nn.Module],
    example: Tensor,
) -> list[Path]:
    """Write losses.png, mixers_<variant>.png and gain.png to `out`."""
    written = [plot.losses({r.name: r.curve for r in results}, out / "losses.png")]
    for name, model in models.items():
        title = f"{name}: H_res per site (mean over positions, held-out batch)"
        written.append(plot.mixers(model, (example,), out / f"mixers_{name}.png", title=title))
    gains = {r.name: r.gain for r in results if r.gain}
    if gains:
        written.append(plot.gains(gains, out / "gain.png"))
    return written


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------ main
def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults, model = TrainConfig(), GPTConfig()
    parser.add_argument(
        "--steps",
        type=int,
        default=defaults.steps,
        help="training steps per variant (default: %(default)s)",
    )
    parser.add_argument(
        "--manifolds",
        help="comma-separated manifolds to compare with the plain model "
        "(default: sinkhorn, hc and the first registered of kronecker, permutation)",
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=defaults.streams,
        help="hyper-connection streams n (default: %(default)s)",
    )
    parser.add_argument(
        "--init",
        choices=INITS,
        help="mixer init (default: hcpass.convert's, identity). identity: every variant "
        "starts out computing exactly what the plain model does, its streams already "
        "different and its H_res mixing them; identity-copies: the same with the streams "
        "starting as copies; identity-sharp: identity-copies with H_res ~ I (the papers' "
        "H_res init, which barely moves in a short run); paper: the papers' init for "
        "training from scratch",
    )
    parser.add_argument(
        "--mixer-lr-scale",
        type=float,
        default=defaults.mixer_lr_scale,
        help="the mixers' learning rate relative to --lr (default: %(default)s; "
        "see hcpass.param_groups)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the initial weights and the batch order (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default=defaults.device, help="cpu or cuda (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="CPU threads for torch (default: %(default)s: the demo's matrices are too small "
        "for intra-op parallelism to pay, and on a busy machine idle-spinning threads make "
        "steps several times slower)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="train under torch.compile (backend='hcpass' for converted variants)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("hcpass-demo"),
        help="directory for results.json and pictures (default: ./%(default)s)",
    )
    size = parser.add_argument_group("model and batch size")
    size.add_argument(
        "--layers", type=int, default=model.layers, help="transformer blocks (default: %(default)s)"
    )
    size.add_argument(
        "--width", type=int, default=model.width, help="model width (default: %(default)s)"
    )
    size.add_argument(
        "--heads", type=int, default=model.heads, help="attention heads (default: %(default)s)"
    )
    size.add_argument(
        "--context",
        type=int,
        default=model.context,
        help="sequence length in bytes (default: %(default)s)",
    )
    size.add_argument(
        "--batch",
        type=int,
        default=defaults.batch,
        help="sequences per step (default: %(default)s)",
    )
    size.add_argument(
        "--lr", type=float, default=defaults.lr, help="peak learning rate (default: %(default)s)"
    )


def configs(args: argparse.Namespace) -> tuple[GPTConfig, TrainConfig]:
    for flag in ("steps", "threads", "layers", "width", "heads", "context", "batch", "streams"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1")
    if not args.mixer_lr_scale > 0:
        raise ValueError("--mixer-lr-scale must be > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch finds no CUDA device")
    gpt = GPTConfig(context=args.context, width=args.width, layers=args.layers, heads=args.heads)
    cfg = TrainConfig(
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        streams=args.streams,
        init=args.init,
        mixer_lr_scale=args.mixer_lr_scale,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        compile=args.compile,
    )
    return gpt, cfg


def describe(gpt: GPTConfig, cfg: TrainConfig, data: tuple[Tensor, Tensor]) -> str:
    return (
        f"byte-level GPT: {gpt.layers} blocks, width {gpt.width}, context {gpt.context}; "
        f"stdlib source: {len(data[0]) / 1e6:.1f} MB to train on, "
        f"{len(data[1]) / 1e6:.1f} MB of other files held out; "
        f"{cfg.steps} steps of {cfg.batch} sequences; "
        f"streams={cfg.streams}, init={cfg.init or 'default'}, "
        f"mixer lr x{cfg.mixer_lr_scale:g}; "
        f"{'torch.compile' if cfg.compile else 'eager'} on {cfg.device}"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The demo; returns what it writes to results.json."""
    begin = time.perf_counter()
    gpt, cfg = configs(args)
    manifolds, notes = choose_manifolds(args.manifolds)
    plots = have_matplotlib()
    if not plots:
        notes.append(f"pictures skipped: {plot.INSTALL_HINT}")
    for note in notes:
        print(f"note: {note}")

    out: Path = args.out
    # Everything that runs the models, pictures included: Dynamo guards on the thread
    # count, so changing it in between would also cost a recompile.
    with torch_threads(cfg.threads):
        data = load_corpus(cfg.corpus_bytes)
        print(describe(gpt, cfg, data))
        results, models, example = compare(gpt, cfg, manifolds, data)
        print()
        print(table(results))
        print()
        for line in verdicts(results):
            print(line)
        print(
            f"(one seed, {cfg.steps} steps: rerun with other --seed values before reading much "
            "into small differences)"
        )
        out.mkdir(parents=True, exist_ok=True)
        written = pictures(out, results, models, example) if plots else []

    summary = {
        "model": asdict(gpt),
        "train": asdict(cfg),
        "train_loss_is": f"mean of the last {TRAIN_LOSS_WINDOW} steps' batch losses",
        "baseline": BASELINE,
        "variants": [asdict(r) for r in results],
        "worse_than_baseline": [
            r.name for r in results[1:] if round(r.val_loss - results[0].val_loss, 4) > 0
        ],
        "notes": notes,
        "seconds": time.perf_counter() - begin,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'results.json'}" + "".join(f", {p.name}" for p in written))
    print(f"total {summary['seconds']:.0f} s")
    return summary
