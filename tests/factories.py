"""Helpers for the CLI, demo and plot tests.

- `tiny_gpt`, `tiny_gpt_kwargs`, `no_sites`, `not_a_model`: factories for ``hcpass explain
  MODULE:FACTORY`` (``tests.factories:tiny_gpt`` from the repository root);
- `rewritten_tiny_gpt`: a rewritten graph to log.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

import hcpass
from hcpass.frontend.capture import capture
from hcpass.runtime.module import MixedGraph
from hcpass.tools.demo.gpt import GPT, GPTConfig

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


def rewritten_tiny_gpt() -> tuple[fx.GraphModule, MixedGraph]:
    """A graph of `tiny_gpt` as a converted module rewrites it (for the logging tests)."""
    model, inputs = tiny_gpt()
    converted = hcpass.convert(model, inputs, streams=2)
    return converted.rewrite(capture(model, inputs, {})[0].gm)
