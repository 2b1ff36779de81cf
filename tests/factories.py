"""Helpers for the CLI, demo and plot tests.

- `tiny_gpt`, `tiny_gpt_kwargs`, `no_sites`, `not_a_model`: factories for ``hcpass explain
  MODULE:FACTORY`` (this module is importable as ``factories`` with tests/ on sys.path).
- `inspect_stand_ins`: test-only implementations of ``hcpass.mixers`` / ``hcpass.gain``
  following their documented contract, used while the package does not provide them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hcpass.demo import GPT, GPTConfig
from hcpass.ops import reference

TINY = GPTConfig(context=8, width=16, layers=1, heads=2)


def tiny_gpt() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return GPT(TINY), (torch.randint(0, TINY.vocab, (2, TINY.context)),)


class KwargsModel(nn.Module):
    """Takes its input as a keyword argument (``explain`` passes example_kwargs through)."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt = GPT(TINY)

    def forward(self, *, ids: torch.Tensor) -> torch.Tensor:
        return self.gpt(ids)


def tiny_gpt_kwargs() -> tuple[nn.Module, tuple, dict[str, Any]]:
    torch.manual_seed(0)
    return KwargsModel(), (), {"ids": torch.randint(0, TINY.vocab, (2, TINY.context))}


def no_sites() -> tuple[nn.Module, tuple[torch.Tensor]]:
    return nn.Linear(4, 4), (torch.randn(2, 4),)


def not_a_model() -> int:
    return 42


# --------------------------------------------------------- hcpass.mixers / hcpass.gain
def _mixers(model: nn.Module, example_inputs, example_kwargs=None) -> dict[str, dict[str, torch.Tensor]]:
    """Records the coefficients every mixer computes in one forward, in forward order
    (assumes each site runs once, as in the demo GPT)."""
    seen: list[tuple[torch.Tensor, ...]] = []
    original = reference.coeffs

    def spy(*args: Any) -> tuple[torch.Tensor, ...]:
        out = original(*args)
        seen.append(tuple(t.detach().clone() for t in out))
        return out

    reference.coeffs = spy
    try:
        with torch.no_grad():
            model(*example_inputs, **(example_kwargs or {}))
    finally:
        reference.coeffs = original
    return {
        key: {"h_pre": pre, "h_post": post, "h_res": res}
        for key, (pre, post, res) in zip(model.mixers, seen, strict=True)
    }


def _gain(model: nn.Module, example_inputs, example_kwargs=None) -> list[dict]:
    rows = []
    product = None
    for depth, c in enumerate(_mixers(model, example_inputs, example_kwargs).values(), 1):
        h_res = c["h_res"].double()
        product = h_res if product is None else h_res @ product
        forward = product.abs().sum(-1).amax(-1).mean()
        backward = product.abs().sum(-2).amax(-1).mean()
        rows.append({"depth": depth, "forward": float(forward), "backward": float(backward)})
    return rows


@contextlib.contextmanager
def inspect_stand_ins() -> Iterator[None]:
    """Provide hcpass.mixers / hcpass.gain for the duration, unless hcpass has its own."""
    import hcpass

    added = [name for name in ("mixers", "gain") if not hasattr(hcpass, name)]
    for name in added:
        setattr(hcpass, name, {"mixers": _mixers, "gain": _gain}[name])
    try:
        yield
    finally:
        for name in added:
            delattr(hcpass, name)
