"""The ``hcpass`` command (also ``python -m hcpass``).

hcpass demo [--steps N] [--manifolds a,b] ...   train plain vs converted GPTs, compare
hcpass explain MODULE:FACTORY [--json]          which adds of a model are residual sites
hcpass manifolds                                the registered mixer manifolds
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import hcpass
from hcpass.text import table

FACTORY_HELP = (
    "MODULE:FACTORY, e.g. mymodels:make_gpt; FACTORY() returns (model, example_inputs) or "
    "(model, example_inputs, example_kwargs). MODULE is imported like `python -m` would "
    "(the current directory is on the path)"
)


class UsageError(Exception):
    """A mistake in the command line or in what it points at: printed without a traceback."""


def load_factory(spec: str) -> Callable[[], Any]:
    """``"pkg.module:factory"`` (or ``"pkg.module:Class.factory"``) -> the callable."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise UsageError(f"expected MODULE:FACTORY, got {spec!r} ({FACTORY_HELP})")
    # A console script's sys.path starts at its own directory, not the user's: put the
    # working directory first, as `python -m` does, so local files are importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(f"cannot import module {module_name!r}: {exc}") from exc
        raise  # the module exists but one of its own imports failed: show the traceback
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{spec} is a {type(target).__name__}, not a callable factory")
    return target


def call_factory(spec: str) -> tuple[Any, tuple, dict[str, Any] | None]:
    made = load_factory(spec)()
    if not isinstance(made, (tuple, list)) or len(made) not in (2, 3):
        raise UsageError(
            f"{spec}() returned {type(made).__name__}; expected (model, example_inputs) or "
            "(model, example_inputs, example_kwargs)"
        )
    model, inputs, kwargs = (*made, None) if len(made) == 2 else made
    # Checked here so a wrong factory is a one-line error, while an error raised inside
    # hcpass.explain keeps its traceback.
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"{spec}() returned a {type(model).__name__} as the model, not an nn.Module"
        )
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise UsageError(f"{spec}() returned example_inputs that are not a tuple or list")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise UsageError(f"{spec}() returned example_kwargs that are not a dict")
    return model, tuple(inputs), kwargs


def cmd_explain(args: argparse.Namespace) -> int:
    model, inputs, kwargs = call_factory(args.factory)
    report = hcpass.explain(model, inputs, kwargs)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def cmd_manifolds(args: argparse.Namespace) -> int:
    available = hcpass.available_manifolds()
    if available:
        print(table(available.items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hcpass.tools.demo.run import run  # the training code, loaded for this command only

    try:
        run(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="hcpass", description="Hyper-connections as a compiler pass."
    )
    commands = root.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run_demo = commands.add_parser(
        "demo",
        help="train a small byte-level GPT plain and converted, compare losses and speed",
        description="Train a small byte-level GPT on Python's standard library, plain and "
        "converted with several manifolds and to Attention Residuals (same initial weights, "
        "batches and steps); print "
        "a comparison table and write results.json and pictures to --out.",
    )
    from hcpass.tools.demo.options import add_arguments  # the flags, not the training code

    add_arguments(run_demo)
    run_demo.set_defaults(handler=cmd_demo)

    explain = commands.add_parser(
        "explain",
        help="list a model's residual sites and why other adds are skipped",
        description="Run hcpass.explain on the model a factory returns and print the report.",
    )
    explain.add_argument("factory", metavar="MODULE:FACTORY", help=FACTORY_HELP)
    explain.add_argument("--json", action="store_true", help="print the report as JSON")
    explain.set_defaults(handler=cmd_explain)

    listing = commands.add_parser("manifolds", help="list the registered mixer manifolds")
    listing.set_defaults(handler=cmd_manifolds)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as exc:
        print(f"hcpass {args.command}: error: {exc}", file=sys.stderr)
        return 2
