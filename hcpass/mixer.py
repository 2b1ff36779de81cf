"""The trainable state of one rewritten residual site."""

from __future__ import annotations

import torch
from torch import nn

from hcpass.manifolds import Manifold


class Mixer(nn.Module):
    """Parameters of one site's mixer: the dynamic projection ``phi`` (absent when the
    manifold is static), the three scales ``alpha`` (likewise) and the bias logits.

    Kept in fp32 whatever the model's dtype: the coefficient path is fp32 by design
    (mHC: alpha and b in fp32, Sinkhorn in fp32).
    """

    def __init__(self, manifold: Manifold, channels: int, site_index: int) -> None:
        super().__init__()
        self.manifold = manifold
        self.channels = channels
        if manifold.dynamic:
            self.phi = nn.Parameter(torch.zeros(manifold.phi_shape(channels)))
            self.alpha = nn.Parameter(manifold.init_alpha())
        else:
            self.register_parameter("phi", None)
            self.register_parameter("alpha", None)
        self.bias = nn.Parameter(manifold.init_bias(site_index))

    @property
    def spec(self) -> str:
        return self.manifold.spec()

    @property
    def streams(self) -> int:
        return self.manifold.streams

    def extra_repr(self) -> str:
        return f"{self.manifold!r}, channels={self.channels}"
