"""How the demo trains and evaluates one model: AdamW on `hcpass.param_groups` with warmup
and cosine decay, the training loop with its progress line, and the held-out loss."""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hcpass
from hcpass.tools.demo.corpus import batch_at
from hcpass.tools.demo.gpt import GPTConfig


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.1
    eval_batches: int = 16
    streams: int = 4
    block_size: int | None = None  # the attnres variant's sites per block (None: full)
    init: str | None = None  # None: hcpass.convert's default
    mixer_lr_scale: float = hcpass.training.MIXER_LR_SCALE
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    compile: bool = False
    corpus_bytes: int = 2_000_000


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Fraction of the peak learning rate: linear warmup, then cosine decay to a tenth."""
    warmup = max(1, min(50, cfg.steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, cfg.steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * t))


def make_schedule(model: nn.Module, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """AdamW on `hcpass.param_groups` (weight decay on matrices, GPT-2 practice, and on the
    mixers' phi and alpha; the mixers at ``cfg.mixer_lr_scale`` times the learning rate),
    scheduled by `lr_factor`."""
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

    def diverged(self, step: int, loss: float, grad_norm: float) -> None:
        end_bar = "\n" if self.tty else ""  # below the redrawn progress line
        self.stream.write(
            f"{end_bar}{self.name:<12} DIVERGED at step {step}/{self.total}: loss {loss}, "
            f"gradient norm {grad_norm}; stopped there\n"
        )
        self.stream.flush()


@dataclass
class Training:
    """What `train` returns: per-step losses and step times, and `diverged_at`, the (1-based)
    step whose loss or gradient was first non-finite, where training stopped (None: it ran
    every step)."""

    curve: list[float]
    times: list[float]
    diverged_at: int | None = None


def train(
    name: str,
    model: nn.Module,
    run: Callable[[Tensor], Tensor],
    data: tuple[Tensor, Tensor],
    gpt: GPTConfig,
    cfg: TrainConfig,
) -> Training:
    """Train `model` (its forward is `run`). Batches come from a generator seeded with
    --seed: every variant sees the same ones. A non-finite loss or gradient stops the run
    before the optimizer step (which would make every weight NaN), so the model stays as it
    was and the step is reported."""
    train_data, _ = data
    generator = torch.Generator().manual_seed(cfg.seed)
    schedule = make_schedule(model, cfg)
    optimizer = schedule.optimizer
    progress = Progress(name, cfg.steps)
    tokens = cfg.batch * gpt.context
    result = Training([], [])
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
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        value = loss.item()
        if not (math.isfinite(value) and math.isfinite(grad_norm)):
            result.curve.append(value)
            result.times.append(time.perf_counter() - begin)
            result.diverged_at = step + 1
            progress.diverged(step + 1, value, grad_norm)
            return result
        optimizer.step()
        schedule.step()
        result.times.append(time.perf_counter() - begin)
        result.curve.append(value)
        progress.update(step, value, tokens / result.times[-1])
    return result


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


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)  # run() may be called in a longer-lived process
