"""The trainable state of one rewritten residual site."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hcpass.manifolds import Manifold


class Mixer(nn.Module):
    """Parameters of one site's mixer: the dynamic projection ``phi`` (absent when the
    manifold is static), the three scales ``alpha`` (likewise) and the bias logits.

    Never narrower than fp32: the coefficient path is fp32 by design (mHC: alpha and b in
    fp32, Sinkhorn in fp32), so ``model.to(torch.bfloat16)``/``.half()`` leave the mixers in
    fp32 (`_apply`). Widening follows the model: ``.double()`` makes them fp64, as an fp64
    gradcheck of a converted model needs.
    """

    def __init__(
        self, manifold: Manifold, channels: int, site_index: int, *, keep_copies: bool = False
    ) -> None:
        super().__init__()
        self.manifold = manifold
        self.channels = channels
        if manifold.dynamic:
            self.phi = nn.Parameter(torch.zeros(manifold.phi_shape(channels)))
            self.alpha = nn.Parameter(manifold.init_alpha())
        else:
            self.register_parameter("phi", None)
            self.register_parameter("alpha", None)
        # keep_copies: the site's chain applies a nonlinear op to every stream (see
        # `Manifold.init_bias`; `hcpass.frontend.plan` decides).
        self.bias = nn.Parameter(manifold.init_bias(site_index, keep_copies=keep_copies))

    @property
    def spec(self) -> str:
        return self.manifold.spec()

    @property
    def streams(self) -> int:
        return self.manifold.streams

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Mixer:
        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            narrowed = (
                t.is_floating_point()
                and out.is_floating_point()
                and torch.finfo(out.dtype).bits < torch.finfo(torch.float32).bits
            )
            # Move without rounding: casting back after fn would keep the bf16 rounding.
            return t.to(device=out.device) if narrowed else out

        return super()._apply(keep_fp32, recurse)

    def extra_repr(self) -> str:
        return f"{self.manifold!r}, channels={self.channels}"
