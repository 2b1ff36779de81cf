"""The demo's comparison: the plain model and one converted copy per variant (a manifold,
or ``attnres``: Attention Residuals), each trained from the same initial weights on the same
batches."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hcpass
from hcpass.runtime.families.attnres import ATTNRES  # also the name of the attnres variant
from hcpass.tools.demo.gpt import GPT, GPTConfig
from hcpass.tools.demo.train import TrainConfig, evaluate, step_ms, train, validation_batches
from hcpass.tools.inspection import DepthProfile

BASELINE = "plain"
TRAIN_LOSS_WINDOW = 20  # the reported train loss is the mean of the last steps' losses


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
    gain: list[dict[str, float]] = field(default_factory=list)  # hyper-connections
    # Attention Residuals: per site, its weights over depth (mean over positions)
    depth_weights: dict[str, list[float]] = field(default_factory=dict)
    # The step whose loss or gradient was first non-finite, where training stopped; its
    # train and held-out losses are then NaN (never compared). None: it trained every step.
    diverged_at: int | None = None
    # After training, on the first held-out batch: magnitudes and gradients over depth.
    depth_profile: DepthProfile | None = None

    @property
    def finite(self) -> bool:
        """Trained every step to finite losses: comparable with another finite result."""
        return self.diverged_at is None and math.isfinite(self.val_loss)


def convert(model: nn.Module, variant: str, example: Tensor, cfg: TrainConfig) -> nn.Module:
    """`model` converted as `variant` says: ``attnres`` (with ``cfg.block_size``) or a
    manifold (with ``cfg.streams`` and ``cfg.init``)."""
    if variant == ATTNRES:
        return hcpass.convert(model, (example,), family=ATTNRES, block_size=cfg.block_size)
    options = {} if cfg.init is None else {"init": cfg.init}
    return hcpass.convert(model, (example,), streams=cfg.streams, manifold=variant, **options)


def run_variant(
    name: str,
    variant: str | None,
    base: GPT,
    data: tuple[Tensor, Tensor],
    held_out: list[tuple[Tensor, Tensor]],
    cfg: TrainConfig,
) -> tuple[Result, nn.Module]:
    """Train a copy of `base`: plain (`variant` None), or converted as `variant` says."""
    begin = time.perf_counter()
    model: nn.Module = copy.deepcopy(base)
    example = held_out[0][0]
    if variant is not None:
        model = convert(model, variant, example, cfg)
    # A fresh Dynamo cache per variant: cached graphs of the previous variant (same GPT
    # class) must not be reused for this one.
    torch._dynamo.reset()
    run: Callable[[Tensor], Tensor] = model
    if cfg.compile:
        run = torch.compile(model, backend="hcpass" if variant else "inductor")
    training = train(name, model, run, data, base.cfg, cfg)
    # Evaluated through the uncompiled module (same parameters): a no-grad graph would cost
    # another Inductor compile for a handful of batches. A diverged run is not evaluated:
    # its weights are those of a shorter run.
    diverged = training.diverged_at is not None
    val_loss = math.nan if diverged else evaluate(model, held_out)
    window = training.curve[-TRAIN_LOSS_WINDOW:]
    result = Result(
        name=name,
        manifold=None if variant == ATTNRES else variant,
        params=sum(p.numel() for p in model.parameters()),
        curve=training.curve,
        train_loss=math.nan if diverged else sum(window) / len(window),
        val_loss=val_loss,
        ms_per_step=step_ms(training.times),
        seconds=time.perf_counter() - begin,
        diverged_at=training.diverged_at,
    )
    return result, model


def inspect(result: Result, variant: str, model: nn.Module, example: Tensor) -> None:
    """Record what the converted model's site modules do on `example`: the composite gain of
    a hyper-connection variant, the weights over depth of the attnres one."""
    if variant == ATTNRES:
        result.depth_weights = {
            name: site.weights.flatten(0, -2).mean(0).tolist()
            for name, site in hcpass.depth_weights(model, (example,)).items()
        }
    else:
        result.gain = hcpass.gain(model, (example,))


def profile(model: nn.Module, batch: tuple[Tensor, Tensor]) -> DepthProfile:
    """`hcpass.depth_profile` on a held-out batch, with its cross-entropy as the loss."""
    x, y = batch

    def loss_fn(logits: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    return hcpass.depth_profile(model, (x,), loss_fn=loss_fn)


def compare(
    gpt: GPTConfig, cfg: TrainConfig, variants: Sequence[str], data: tuple[Tensor, Tensor]
) -> tuple[list[Result], dict[str, nn.Module], Tensor]:
    """Train the plain model and one converted copy per variant (manifold or ``attnres``)
    from the same initial weights. Returns the results (plain first), the converted models
    and the held-out batch their site modules are inspected on."""
    held_out = validation_batches(data[1], gpt, cfg)
    torch.manual_seed(cfg.seed)
    base = GPT(gpt).to(cfg.device)
    results: list[Result] = []
    models: dict[str, nn.Module] = {}
    for variant in [None, *variants]:
        name = variant or BASELINE
        result, model = run_variant(name, variant, base, data, held_out, cfg)
        result.depth_profile = profile(model, held_out[0])
        if variant is not None:
            inspect(result, variant, model, held_out[0][0])
            models[name] = model
        results.append(result)
    return results, models, held_out[0][0]
