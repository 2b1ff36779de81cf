"""Optimizer settings for training a converted model (docs/training.md)."""

from __future__ import annotations

from typing import Any

from torch import nn

from hcpass.runtime.mixer import Mixer
from hcpass.runtime.module import ConvertedModule

# The mixers' learning rate relative to the model's. Their bias logits start where a step of
# the model's learning rate is a small change of H_res, and a run is a few thousand Adam
# steps at most; chosen with benchmarks/learning.py (docs/training.md).
MIXER_LR_SCALE = 3.0


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    mixer_lr_scale: float = MIXER_LR_SCALE,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a converted `model`:

    - the original parameters of 2 or more dims (weights): `lr`, `weight_decay`;
    - the original parameters of fewer dims (biases, norms): `lr`, no weight decay;
    - the mixers (``mixers.*``) at ``lr * mixer_lr_scale``: the hyper-connection mixers'
      dynamic part (the projection phi and the scales alpha) with `weight_decay`, the rest
      (their bias logits, Attention Residuals' pseudo-queries) without. Decay pulls phi and
      alpha towards 0, their init (alpha starts at 0.01): it keeps the per-position logits
      alpha * (x phi) from growing into saturated routing, which trained worse in long runs
      (docs/training.md). On the bias logits it would pull towards 0, which is not their init.

    Empty groups are left out. Use as ``torch.optim.AdamW(hcpass.param_groups(model,
    lr=3e-3, weight_decay=0.1))``; a scheduler such as ``LambdaLR`` scales every group's
    `lr` by the same factor, so the ratio is kept. `model` may be wrapped
    (``torch.compile``, DDP) or an unconverted module (no mixers group), so the same code
    trains the baseline."""
    if not (isinstance(mixer_lr_scale, (int, float)) and mixer_lr_scale > 0):
        raise ValueError(f"mixer_lr_scale must be a number > 0, got {mixer_lr_scale!r}")
    # Every converted module inside `model`: it may be wrapped (torch.compile's
    # OptimizedModule, DDP) or hold several converted parts.
    converted = [m for m in model.modules() if isinstance(m, ConvertedModule)]
    mixers = {id(p): p for m in converted for p in m.mixers.parameters()}
    dynamic = {
        id(p)
        for m in converted
        for site in m.mixers.modules()
        if isinstance(site, Mixer) and site.phi is not None
        for p in (site.phi, site.alpha)
    }
    own = [p for p in model.parameters() if p.requires_grad and id(p) not in mixers]
    trained = [p for p in mixers.values() if p.requires_grad]
    groups = [
        {"params": [p for p in own if p.dim() >= 2], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for p in own if p.dim() < 2], "lr": lr, "weight_decay": 0.0},
        {
            "params": [p for p in trained if id(p) not in dynamic],
            "lr": lr * mixer_lr_scale,
            "weight_decay": 0.0,
        },
        {
            "params": [p for p in trained if id(p) in dynamic],
            "lr": lr * mixer_lr_scale,
            "weight_decay": weight_decay,
        },
    ]
    return [g for g in groups if g["params"]]
