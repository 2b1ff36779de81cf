"""``hcpass demo``'s command line: its flags, the configs they give, and which variants
(manifolds, and ``attnres``) it runs. Light to import: the command line builds its parser
from it without loading the training code."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import hcpass
from hcpass.manifolds.base import INITS
from hcpass.tools.demo.gpt import GPTConfig
from hcpass.tools.demo.train import TrainConfig
from hcpass.tools.demo.variants import ATTNRES

# Tried in order; the first registered of EXACT is added to the defaults, so the demo shows
# one manifold whose H_res is exactly doubly stochastic (no Sinkhorn iterations). The attnres
# variant comes last: about plain's step time, it added 11 % to the default demo's time.
DEFAULT_MANIFOLDS = ("sinkhorn", "hc")
EXACT = ("kronecker", "permutation")


def registered_manifolds() -> set[str]:
    """Every registered manifold name and alias, from the labels of `hcpass.available_manifolds()`
    (``"kronecker (kromhc)"``)."""
    names: set[str] = set()
    for label in hcpass.available_manifolds():
        name, _, aliases = label.partition(" (")
        names.add(name)
        names.update(aliases.rstrip(")").split(", ") if aliases else ())
    return names


def choose_manifolds(requested: str | None) -> tuple[list[str], list[str]]:
    """(variants to run: manifolds, and ``attnres``; notes about defaults that are not
    registered)."""
    registered = registered_manifolds()
    if requested:
        names = [m.strip() for m in requested.split(",") if m.strip()]
        unknown = [m for m in names if m not in registered and m != ATTNRES]
        if unknown:
            valid = ", ".join(sorted(registered))
            raise ValueError(
                f"unknown manifold(s) {', '.join(unknown)}; registered: {valid} "
                f"(and {ATTNRES}: Attention Residuals)"
            )
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
    return [*chosen, ATTNRES], notes


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
        help="comma-separated manifolds to compare with the plain model, and/or "
        f"{ATTNRES} (Attention Residuals: hcpass.convert(..., family='attnres')) "
        "(default: sinkhorn, hc, the first registered of kronecker, permutation, and "
        f"{ATTNRES})",
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=defaults.streams,
        help="hyper-connection streams n (default: %(default)s)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=defaults.block_size,
        help=f"sites per block of the {ATTNRES} variant, attention and MLP counted "
        "separately (default: full Attention Residuals, every site a block of its own)",
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
    if args.block_size is not None and args.block_size < 1:
        raise ValueError("--block-size must be at least 1")
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
        block_size=args.block_size,
        init=args.init,
        mixer_lr_scale=args.mixer_lr_scale,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        compile=args.compile,
    )
    return gpt, cfg
