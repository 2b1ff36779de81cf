"""From the parameters a rewritten graph is called with to the mixers of its sites.

Dynamo reuses a compiled graph for every module instance of the same class (parameters are
graph inputs), so a rewritten graph finds its mixers at call time: each mixer is keyed on a
parameter of its branch (the site's anchor), and the graph is called with the running
module's parameter tensors. `SiteLookup` also knows the plan's chains (which site follows
which), for the hand-off across graph breaks (`hcpass.runtime.handoff.ChainLookup`) and the
checks after each call (`hcpass.runtime.checks`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hcpass.frontend.capture import unwrapped_parameters
from hcpass.frontend.plan import Plan
from hcpass.rewrite.base import MixerInputs, MixerSlot
from hcpass.runtime.mixer import SiteModule


class SiteLookup:
    """The sites of one converted module, by anchor parameter and by mixer key."""

    def __init__(self, plan: Plan, model: nn.Module, mixers: nn.ModuleDict) -> None:
        self._model = model
        self._mixers = mixers
        self._key_of = {site.anchor: site.key for site in plan.planned}
        self._follows = {site.key: site.follows for site in plan.planned}
        self._label_of = {site.key: site.name for site in plan.planned}
        self.runs = plan.runs  # site executions per forward (a shared block counts each call)
        self._names_by_id: dict[int, tuple[str, torch.Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Ids are per process and per object: a copy or an unpickled module scans again.
        return {**self.__dict__, "_names_by_id": {}}

    def forget_parameters(self) -> None:
        """Drop the id -> parameter map (it is rebuilt on the next lookup)."""
        self._names_by_id = {}

    @property
    def keys(self) -> set[str]:
        """The mixer keys of every planned site."""
        return set(self._key_of.values())

    def planned(self, anchor: str) -> bool:
        """Whether the site keyed on the parameter named `anchor` got a mixer."""
        return anchor in self._key_of

    def slot(self, anchor: str) -> MixerSlot:
        """What a rewrite needs of the mixer keyed on the parameter named `anchor`."""
        key = self._key_of[anchor]
        module: SiteModule = self._mixers[key]
        return MixerSlot(key, module.spec, module.graph_parameters, getattr(module, "streams", 1))

    def _anchor_name(self, anchor: torch.Tensor) -> str | None:
        # Called per mixer per forward: scan the parameters again only on a miss. The map
        # holds the tensors so that an id is only trusted for the tensor it was taken from
        # (ids are reused once load_state_dict(assign=True) frees the old parameters).
        hit = self._names_by_id.get(id(anchor))
        if hit is None or hit[1] is not anchor:
            self._names_by_id = {id(p): (name, p) for name, p in unwrapped_parameters(self._model)}
            hit = self._names_by_id.get(id(anchor))
        return hit[0] if hit is not None else None

    def site_key(self, anchor: torch.Tensor) -> str:
        """The mixer key of the site whose mixer is keyed on the parameter `anchor`."""
        name = self._anchor_name(anchor)
        key = self._key_of.get(name) if name is not None else None
        if key is None:
            raise RuntimeError(
                f"hcpass: a graph rewritten for a converted model was called with parameter "
                f"{name or '(not one of this model)'}, which no mixer of this "
                f"{type(self._model).__name__} is keyed on: Dynamo reused a graph across "
                "models with different residual sites"
            )
        return key

    def follows(self, key: str) -> str | None:
        """The site before `key`'s in its planned chain (None where the chain starts)."""
        return self._follows[key]

    def site_label(self, key: str) -> str:
        return self._label_of[key]

    def restarted(self, anchor: torch.Tensor) -> str | None:
        """If the site keyed on `anchor` starts a chain that the plan continues from an
        earlier site, that cut ("site (after earlier site)")."""
        key = self.site_key(anchor)
        before = self._follows[key]
        return None if before is None else f"{self._label_of[key]} (after {self._label_of[before]})"

    def mixer_parameters(
        self, anchor: torch.Tensor, inputs: MixerInputs
    ) -> tuple[str, list[torch.Tensor]]:
        """The key and parameters of the site module keyed on `anchor`, checked against the
        graph's slot."""
        key = self.site_key(anchor)
        module: SiteModule = self._mixers[key]
        # Same spec and parameters: `MixedGraph` reaches here only for a module with the
        # rewrite_key the graph was built for.
        if module.channels != inputs.channels:
            raise RuntimeError(
                f"hcpass: at these inputs the stream of site {self._label_of[key]} has "
                f"{inputs.channels} channels, and its mixer was converted with "
                f"{module.channels}: a mixer has a fixed width. hcpass takes as channels the "
                "stream dimension that the branch's first linear layer, norm or convolution "
                "acts on; here that dimension's size follows the "
                "input's shape, so this site cannot run converted at these inputs. Call the "
                "model with inputs that keep it, or convert a model whose blocks have a fixed "
                "width"
            )
        return key, [getattr(module, name) for name in inputs.slot.parameters]

    def replaced_parameters(self) -> list[str]:
        """The mixers' anchor parameters that the model no longer holds as parameters."""
        replaced = []
        for name in self._key_of:
            owner, _, leaf = name.rpartition(".")
            try:
                module = self._model.get_submodule(owner)
            except AttributeError:  # the layer itself is gone
                module = None
            if not isinstance(getattr(module, leaf, None), nn.Parameter):
                replaced.append(name)
        return replaced
