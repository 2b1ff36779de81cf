"""The trainable state of one rewritten residual site: `SiteModule`, and the hyper-connection
`Mixer` (Attention Residuals: `hcpass.runtime.pseudo_query`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hcpass.manifolds import Manifold


class SiteModule(nn.Module):
    """A site's parameters, as the rewritten graph takes them (``ConvertedModule.mixers``).

    Never narrower than fp32: the parameters feed fp32 coefficient math by design (mHC:
    alpha and b in fp32, Sinkhorn in fp32; Attention Residuals: fp32 logits over depth), so
    ``model.to(torch.bfloat16)``/``.half()`` leave them in fp32 (`_apply`). Widening
    follows the model: ``.double()`` makes them fp64, as an fp64 gradcheck needs.
    """

    channels: int

    @property
    def spec(self) -> str:
        """What the site computes with these parameters; a cached graph checks it."""
        raise NotImplementedError

    @property
    def graph_parameters(self) -> tuple[str, ...]:
        """The names of the parameters the rewritten graph takes, in order."""
        raise NotImplementedError

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            narrowed = (
                t.is_floating_point()
                and out.is_floating_point()
                and torch.finfo(out.dtype).bits < torch.finfo(torch.float32).bits
            )
            # Cast from the original (fp32, or fp64 after .double()) to fp32: casting fn's
            # result back would keep the bf16 rounding.
            return t.to(device=out.device, dtype=torch.float32) if narrowed else out

        return super()._apply(keep_fp32, recurse)


class Mixer(SiteModule):
    """Parameters of one site's mixer: the dynamic projection ``phi`` (absent when the
    manifold is static), the three scales ``alpha`` (likewise) and the bias logits."""

    def __init__(
        self, manifold: Manifold, channels: int, chain_position: int, *, keep_copies: bool = False
    ) -> None:
        super().__init__()
        self.manifold = manifold
        self.channels = channels
        if manifold.dynamic:
            self.phi = nn.Parameter(torch.empty(manifold.phi_shape(channels)))
            self.alpha = nn.Parameter(torch.empty(3))
        else:
            self.register_parameter("phi", None)
            self.register_parameter("alpha", None)
        self.bias = nn.Parameter(torch.empty(manifold.num_logits))
        # keep_copies: the site's chain applies a nonlinear op to every stream (see
        # `Manifold.init_bias`; `hcpass.frontend.plan` decides).
        self.chain_position, self.keep_copies = chain_position, keep_copies
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The function-preserving init; also after a model built on the meta device is
        materialised (``to_empty``, then each module's ``reset_parameters``)."""
        with torch.no_grad():
            if self.phi is not None:
                self.phi.zero_()
                self.alpha.copy_(self.manifold.init_alpha())
            self.bias.copy_(
                self.manifold.init_bias(self.chain_position, keep_copies=self.keep_copies)
            )

    @property
    def spec(self) -> str:
        return self.manifold.spec()

    @property
    def streams(self) -> int:
        return self.manifold.streams

    @property
    def graph_parameters(self) -> tuple[str, ...]:
        return ("phi", "alpha", "bias") if self.manifold.dynamic else ("bias",)

    def extra_repr(self) -> str:
        return f"{self.manifold!r}, channels={self.channels}"
