"""The trainable state of one Attention Residuals site: its pseudo-query."""

from __future__ import annotations

import torch
from torch import nn

from hcpass.runtime.mixer import SiteModule


class PseudoQuery(SiteModule):
    """The pseudo-query ``w_l`` with which site l's branch attends over the chain's values
    (``query``; absent at a chain's first site, which reads ``x_0`` alone), and, at the
    chain's last site, the query of the chain's output (``output_query``). Both start at
    zero: uniform weights over depth (docs/math.md)."""

    def __init__(
        self, channels: int, spec: str, *, starts_chain: bool = False, ends_chain: bool = False
    ) -> None:
        super().__init__()
        self.channels = channels
        self._spec = spec
        zeros = lambda: nn.Parameter(torch.zeros(channels))  # noqa: E731
        self.query = None if starts_chain else zeros()
        self.output_query = zeros() if ends_chain else None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for query in (self.query, self.output_query):
                if query is not None:
                    query.zero_()

    @property
    def spec(self) -> str:
        return self._spec

    @property
    def graph_parameters(self) -> tuple[str, ...]:
        names = ("query", "output_query")
        return tuple(n for n in names if getattr(self, n) is not None)

    def extra_repr(self) -> str:
        return f"{self._spec}, channels={self.channels}" + (
            ", ends its chain" if self.output_query is not None else ""
        )
