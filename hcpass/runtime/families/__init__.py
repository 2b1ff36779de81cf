"""The rewrite families `hcpass.convert(..., family=...)` chooses from: one `Family` record
per file of this package, each defining ``FAMILY``. A third family is one new file here.

A record says everything that differs between families: the options it takes, which chains
it can rewrite, the trainable module of each site and the graph rewrite. Everything else
(capture, site finding, the plan, the runtime, the lowering) is shared, and nothing outside
the records asks which family it has.

Why the records live in the runtime stage: a record holds its site module
(`hcpass.runtime.mixer`, `hcpass.runtime.pseudo_query`) and its rewrite (`hcpass.rewrite`),
and a stage imports only from earlier ones (tests/project/test_layout.py), so the runtime is
the first stage that can hold both. The front end runs before the rewrite and knows no
family: it is handed what it needs of one, the family's narrowing of the sites
(`Family.narrow`, a function of the front end's own `SiteAnalysis`), by the caller
(`hcpass.frontend.plan.analyse`/`plan`). The API and tools reach the records through here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from torch import fx

from hcpass.frontend.plan import Narrow, PlannedSite
from hcpass.frontend.sites import Site, SiteAnalysis
from hcpass.rewrite.base import MixerSlot, RewriteResult
from hcpass.runtime.mixer import SiteModule

Options = TypeVar("Options")

# The family `convert` and `explain` use when none is named.
DEFAULT = "hyper-connections"


@dataclass(frozen=True, eq=False)
class Family(Generic[Options]):
    """One rewrite family. Every field is a module-level function: a converted module
    holds its family, and is pickled and copied with it (by name: `__reduce__`)."""

    name: str  # the value of convert's ``family=``
    # convert's keyword options (streams, manifold, block_size, and the rest) -> the
    # family's options, validated; a clear ValueError for an option of another family.
    options: Callable[..., Options]
    # Which chains the family can rewrite (`Narrow`); None: every chain the front end finds.
    narrow: Narrow | None
    # A planned site -> its trainable module (`ConvertedModule.mixers[site.key]`).
    site_module: Callable[[PlannedSite, Options], SiteModule]
    # Rewrite the graph in place: its sites (after `narrow`), with their modules' slots.
    rewrite: Callable[[fx.Graph, SiteAnalysis, dict[Site, MixerSlot], Options], RewriteResult]

    def __reduce__(self) -> tuple[Any, ...]:
        return family, (self.name,)


def _discover() -> dict[str, Family[Any]]:
    """Every ``FAMILY`` of this package's modules, the default first."""
    found = [
        importlib.import_module(f"{__name__}.{module.name}").FAMILY
        for module in pkgutil.iter_modules(__path__)
    ]
    found.sort(key=lambda f: (f.name != DEFAULT, f.name))
    return {f.name: f for f in found}


_FAMILIES = _discover()

# The families' names, the default first (`hcpass.FAMILIES`).
NAMES: tuple[str, ...] = tuple(_FAMILIES)


def family(name: str) -> Family[Any]:
    """The family named `name`; ValueError naming the others for any other name."""
    found = _FAMILIES.get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"unknown family {name!r}; choose one of {', '.join(NAMES)}")
    return found
