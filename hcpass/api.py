"""The public entry points: `explain`, `convert`, `compile`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hcpass.frontend.capture import capture
from hcpass.frontend.plan import NO_GRAPH, WHAT_IS_A_SITE, Report, plan
from hcpass.runtime import families
from hcpass.runtime.module import ConvertedModule


def _validate_model(model: nn.Module, example_inputs: Sequence[Any], example_kwargs) -> tuple:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, ConvertedModule):
        raise ValueError(
            "this model is already converted by hcpass; its `.original` is the model "
            "without mixers (explain or convert that)"
        )
    inner = next(
        (name for name, m in model.named_modules() if isinstance(m, ConvertedModule)), None
    )
    if inner is not None:
        raise ValueError(
            f"submodule {inner!r} of this model is already converted by hcpass; convert the "
            f"model with the original in its place (`model.{inner} = model.{inner}.original`), "
            "or leave the rest of the model unconverted"
        )
    _refuse_fully_sharded(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tuple of positional arguments")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError("example_kwargs must be a dict")
    return tuple(example_inputs), dict(example_kwargs or {})


def _refuse_fully_sharded(model: nn.Module) -> None:
    """Refuse a model with FSDP2-sharded modules: convert first, then `fully_shard`.

    FSDP2 swaps a sharded module's parameters for gathered copies in hooks around its
    forward, outside the graphs hcpass captures, so no branch would be seen reading a
    parameter. And mixers made after `fully_shard` would belong to no FSDP module: their
    gradients would not be reduced across the data-parallel ranks."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    sharded = next((name for name, m in model.named_modules() if isinstance(m, FSDPModule)), None)
    if sharded is not None:
        where = f"its submodule {sharded!r}" if sharded else "its root module"
        raise ValueError(
            f"hcpass got a model with {where} sharded by FSDP2's fully_shard: convert "
            "before fully_shard, then fully_shard the blocks and the converted model (the "
            "mixers are the converted root's parameters). Sharded first, FSDP2 swaps each "
            "module's parameters for gathered copies outside the graphs hcpass captures, "
            "and mixers made afterwards would be in no FSDP group: their gradients would not "
            "be reduced across data-parallel ranks. Tensor parallelism (parallelize_module) "
            "may come before or after convert"
        )


def _refuse_compiled_root(model: nn.Module) -> None:
    """Refuse a compiled model: convert it first, then compile with backend="hcpass".

    Kept compiled, its first call would fail: the converted forward runs the original under
    Dynamo itself, and only backend="hcpass" gives a compiled graph its mixers. Converting
    the wrapped module and compiling the result again was the other choice; it is refused
    instead because the compile's backend and options would not carry over (Inductor's
    ``mode`` and ``options`` are not the hcpass backend's, which takes none), and a result
    compiled with another backend than the one asked for would be a silent change."""
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, OptimizedModule):
        name = type(model._orig_mod).__name__
        raise ValueError(
            f"hcpass.convert got a compiled model (torch.compile of a {name}): convert the "
            "model before compiling it, then compile the converted model with the hcpass "
            "backend: `converted = hcpass.convert(model._orig_mod, ...)`, then "
            "`torch.compile(converted, backend='hcpass')` (hcpass.compile does both)"
        )
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise ValueError(
            f"hcpass.convert got a {type(model).__name__} compiled in place "
            "(`model.compile()`): convert the model before compiling it, then compile the "
            "converted model with the hcpass backend: `converted.compile(backend='hcpass')` "
            "(or hcpass.compile, which converts and compiles)"
        )


def explain(
    model: nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    family: str = families.DEFAULT,
) -> Report:
    """Which adds of `model` are residual sites `family` rewrites, and why the others are
    skipped (with ``family="attnres"``, per chain: why it cannot become Attention Residuals).

    The model is run once on the example inputs under Dynamo (no grad; its buffers and
    the RNG state are restored)."""
    narrow = families.family(family).narrow
    args, kwargs = _validate_model(model, example_inputs, example_kwargs)
    return plan(model, capture(model, args, kwargs), narrow).report


def convert(
    model: nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    family: str = families.DEFAULT,
    streams: int | None = None,
    manifold: str | None = None,
    block_size: int | None = None,
    **manifold_options: Any,
) -> ConvertedModule:
    """Rewrite every residual chain of `model`.

    ``family="hyper-connections"`` (the default): into `streams` (default 4) parallel
    streams mixed by `manifold` (default ``"sinkhorn"``) mixers
    (`hcpass.available_manifolds()` lists them); options are the manifold's (``dynamic``,
    ``init``, ``alpha``, ``sinkhorn_iters``, ...).

    ``family="attnres"``: into Attention Residuals, each branch reading a softmax over
    depth of the chain's earlier values; ``block_size`` sites per block (None: full
    Attention Residuals). Only pre-norm chains convert (`explain` says why others don't).

    Returns a trainable module that owns `model`'s parameters under their original names
    plus ``mixers.*`` (mixers, or pseudo-queries); at init it computes what `model` did.
    """
    chosen = families.family(family)
    options = chosen.options(
        streams=streams, manifold=manifold, block_size=block_size, **manifold_options
    )
    args, kwargs = _validate_model(model, example_inputs, example_kwargs)
    _refuse_compiled_root(model)
    graphs = capture(model, args, kwargs)
    found = plan(model, graphs, chosen.narrow)
    if found.report.graphs == 0:
        raise ValueError(f"hcpass cannot convert {type(model).__name__}: {NO_GRAPH}.")
    if not found.planned:
        detail = "\n".join(f"  {s.name}: {s.reason}" for s in found.report.skipped)
        raise ValueError(
            f"hcpass found no residual sites to rewrite in {type(model).__name__}; "
            f"{WHAT_IS_A_SITE}."
            + (f"\nCandidate adds that were skipped:\n{detail}" if detail else "")
        )
    mixers = {site.key: chosen.site_module(site, options) for site in found.planned}
    converted = ConvertedModule(model, found, mixers, chosen, options, graphs)
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    if reference is None:
        return converted
    # The mixers follow the model's device and, never narrower than fp32 (`SiteModule`), its
    # dtype: an fp64 model gets fp64 mixers, as after `.double()`.
    converted.mixers.to(device=reference.device, dtype=reference.dtype)
    return converted


def compile(
    model: nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    compile_options: dict[str, Any] | None = None,
    **convert_options: Any,
) -> Callable[..., Any]:
    """`convert` (with `convert_options`: ``family``, ``streams``, ``manifold``, ...), then
    ``torch.compile(..., backend="hcpass")``."""
    converted = convert(model, example_inputs, example_kwargs, **convert_options)
    return torch.compile(converted, backend="hcpass", **(compile_options or {}))
