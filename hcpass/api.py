"""The public entry points: `explain`, `convert`, `compile`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hcpass import manifolds
from hcpass.frontend.capture import capture
from hcpass.frontend.plan import WHAT_IS_A_SITE, Report, plan
from hcpass.runtime.mixer import Mixer
from hcpass.runtime.module import ConvertedModule


def _validate_model(model: nn.Module, example_inputs: Sequence[Any], example_kwargs) -> tuple:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, ConvertedModule):
        raise ValueError("this model is already converted by hcpass")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tuple of positional arguments")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError("example_kwargs must be a dict")
    return tuple(example_inputs), dict(example_kwargs or {})


def explain(
    model: nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
) -> Report:
    """Which adds of `model` are residual sites, and why the others are skipped.

    The model is run once on the example inputs under Dynamo (no grad; its buffers and
    the RNG state are restored)."""
    args, kwargs = _validate_model(model, example_inputs, example_kwargs)
    return plan(model, capture(model, args, kwargs)).report


def convert(
    model: nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    streams: int = 4,
    manifold: str = "sinkhorn",
    **manifold_options: Any,
) -> ConvertedModule:
    """Rewrite every residual chain of `model` into `streams` parallel streams mixed by
    `manifold` mixers (`hcpass.manifolds.available()` lists them).

    Returns a trainable module that owns `model`'s parameters under their original names
    plus ``mixers.*``; with the default ``init="identity"`` it computes what `model` did.
    Options are the manifold's (``dynamic``, ``init``, ``alpha``, ``sinkhorn_iters``, ...).
    """
    mixer_manifold = manifolds.create(manifold, streams, **manifold_options)
    args, kwargs = _validate_model(model, example_inputs, example_kwargs)
    graphs = capture(model, args, kwargs)
    found = plan(model, graphs)
    if not found.sites:
        detail = "\n".join(f"  {s.name}: {s.reason}" for s in found.report.skipped)
        raise ValueError(
            f"hcpass found no residual sites in {type(model).__name__}; {WHAT_IS_A_SITE}."
            + (f"\nCandidate adds that were skipped:\n{detail}" if detail else "")
        )
    mixers = {
        site.key: Mixer(mixer_manifold, site.channels, site.position, keep_copies=site.keep_copies)
        for site in found.sites
    }
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return ConvertedModule(model, found, mixers, graphs).to(device)


def compile(
    model: nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    streams: int = 4,
    manifold: str = "sinkhorn",
    compile_options: dict[str, Any] | None = None,
    **manifold_options: Any,
) -> Callable[..., Any]:
    """`convert`, then ``torch.compile(..., backend="hcpass")``."""
    converted = convert(
        model,
        example_inputs,
        example_kwargs,
        streams=streams,
        manifold=manifold,
        **manifold_options,
    )
    return torch.compile(converted, backend="hcpass", **(compile_options or {}))
