"""The model and batches the CPU benchmarks (compile_time.py, cpu_step.py) measure: the demo's
pre-norm GPT (LayerNorm, causal SDPA attention, a GELU MLP: two residual sites per layer) on
random byte tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hcpass.tools.demo.gpt import GPT, GPTConfig


def model(dim: int, layers: int, heads: int, context: int) -> nn.Module:
    return GPT(GPTConfig(context=context, width=dim, layers=layers, heads=heads))


def batch(size: int, length: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(GPTConfig.vocab, (size, length + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def loss(model: nn.Module, ids: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
