"""Attention Residuals (Kimi Team, 2026): each branch reads a softmax over depth of its
chain's earlier values, with a `PseudoQuery` per site. Only pre-norm chains with a final
norm convert (`hcpass.frontend.attnres.keep_convertible` says why the others don't); the
rewrite is `hcpass.rewrite.attnres`."""

from __future__ import annotations

from typing import Any

from hcpass.frontend.attnres import keep_convertible
from hcpass.frontend.plan import PlannedSite
from hcpass.rewrite.attnres import AttnResOptions, rewrite_attnres
from hcpass.runtime.families import Family
from hcpass.runtime.pseudo_query import PseudoQuery

ATTNRES = "attnres"


def options(*, block_size: int | None = None, **others: Any) -> AttnResOptions:
    """`block_size` sites per block (None: full Attention Residuals); nothing else."""
    wrong = sorted(name for name, value in others.items() if value is not None)
    if wrong:
        raise ValueError(
            f"{', '.join(wrong)}: options of family='hyper-connections'; "
            "family='attnres' takes block_size"
        )
    return AttnResOptions(block_size)


def site_module(site: PlannedSite, options: AttnResOptions) -> PseudoQuery:
    return PseudoQuery(
        site.channels,
        options.spec(),
        starts_chain=site.chain_position == 0,
        ends_chain=site.ends_chain,
    )


FAMILY = Family(ATTNRES, options, keep_convertible, site_module, rewrite_attnres)
