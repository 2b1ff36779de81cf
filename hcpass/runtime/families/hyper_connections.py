"""Hyper-connections (HC, mHC and its variants): each residual chain widened to n streams,
mixed at every site by a `Mixer` on a manifold (`hcpass.manifolds`); the rewrite is
`hcpass.rewrite.chains`. The default family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx

from hcpass import manifolds
from hcpass.frontend.plan import PlannedSite
from hcpass.frontend.sites import Site, SiteAnalysis
from hcpass.manifolds import Manifold
from hcpass.rewrite.base import MixerSlot, RewriteResult
from hcpass.rewrite.chains import rewrite_chains
from hcpass.runtime.families import Family
from hcpass.runtime.mixer import Mixer

HYPER_CONNECTIONS = "hyper-connections"


@dataclass(frozen=True)
class HyperConnectionOptions:
    manifold: Manifold  # with its streams and options: what every site's mixer computes


def options(
    *,
    streams: int | None = None,
    manifold: str | None = None,
    block_size: int | None = None,
    **manifold_options: Any,
) -> HyperConnectionOptions:
    """`streams` (default 4) mixed by `manifold` (default ``"sinkhorn"``) with the manifold's
    own options (`manifolds.create` validates them)."""
    if block_size is not None:
        raise ValueError("block_size is an option of family='attnres'")
    streams = 4 if streams is None else streams
    return HyperConnectionOptions(
        manifolds.create(manifold or "sinkhorn", streams, **manifold_options)
    )


def site_module(site: PlannedSite, options: HyperConnectionOptions) -> Mixer:
    return Mixer(options.manifold, site.channels, site.chain_position, keep_copies=site.keep_copies)


def rewrite(
    graph: fx.Graph,
    analysis: SiteAnalysis,
    slots: dict[Site, MixerSlot],
    options: HyperConnectionOptions,
) -> RewriteResult:
    # The manifold travels in each slot's spec: the rewrite needs nothing more of it.
    return rewrite_chains(graph, analysis, slots)


FAMILY = Family(HYPER_CONNECTIONS, options, None, site_module, rewrite)
