"""The module `hcpass.convert` returns, and how its rewritten graphs find their mixers.

A `ConvertedModule` owns the original model's parameters under their original names plus
``mixers.<site>``. Its forward runs the original model under Dynamo; every graph Dynamo
captures is rewritten (`hcpass.plan` + `hcpass.rewrite`) and run eagerly -- or, when the
module itself is under ``torch.compile(backend="hcpass")``, lowered by the backend.

Dynamo reuses a compiled graph for every module instance of the same class (parameters
are graph inputs), so a rewritten graph looks its mixers up at call time, from the
parameter tensors it is called with (each mixer is keyed on a parameter of its branch) and
the `ConvertedModule` whose forward is running (a context variable).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from hcpass import handoff, logs
from hcpass.capture import (
    annotate_parameters,
    fresh_function,
    fresh_trampoline,
    parameter_names,
    visible_residuals,
)
from hcpass.mixer import Mixer
from hcpass.plan import Plan, Report, analyse
from hcpass.rewrite import MixerInputs, MixerSlot, rewrite_chains

log = logging.getLogger("hcpass")


@dataclass
class _Run:
    """One forward call of a ConvertedModule."""

    owner: ConvertedModule
    mixers_ran: int = 0
    observer: TorchDispatchMode | None = None  # sees the mixer ops (hcpass.mixers)
    handoffs: handoff.Handoffs = field(default_factory=handoff.Handoffs)


_RUN: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("hcpass_run", default=None)


def current_owner() -> ConvertedModule | None:
    """The ConvertedModule whose forward is running (None outside one)."""
    run = _RUN.get()
    return run.owner if run is not None else None


@dataclass(frozen=True)
class MixedGraph:
    """A rewritten graph as Dynamo calls it: appends the running module's mixer parameters."""

    fn: Callable[..., Any]
    mixers: tuple[tuple[int, MixerInputs], ...]  # (index of the anchor input, mixer)
    sites: int
    # Chains crossing the graph's boundary with their n streams (hcpass.handoff).
    stream_inputs: tuple[handoff.StreamInput, ...] = ()
    stream_outputs: tuple[handoff.StreamOutput, ...] = ()
    dense: bool = False  # fn was compiled for contiguous n-stream inputs

    def __call__(self, *args: Any) -> Any:
        run = _RUN.get()
        if run is None:
            raise RuntimeError(
                "hcpass: a graph rewritten for a converted model was called outside its "
                "forward (Dynamo reused a cached graph for a plain model of the same class); "
                "call torch._dynamo.reset() before compiling the plain model"
            )
        params: list[torch.Tensor] = []
        for index, inputs in self.mixers:
            params += run.owner.mixer_parameters(args[index], inputs)
        states = handoff.enter(run.handoffs, run.owner, self.stream_inputs, args, self.dense)
        run.mixers_ran += self.sites
        if run.observer is not None:
            with run.observer:
                result = self.fn(*args, *params, *states)
        else:
            result = self.fn(*args, *params, *states)
        return handoff.leave(run.handoffs, run.owner, self.stream_outputs, args, result)


class ConvertedModule(nn.Module):
    """`model` with its residual chains widened to n streams (see `hcpass.convert`)."""

    def __init__(self, model: nn.Module, plan: Plan, mixers: dict[str, Mixer]) -> None:
        super().__init__()
        clashes = sorted(
            name
            for name in [*model._modules, *model._parameters, *model._buffers, "mixers"]
            if hasattr(ConvertedModule, name) or (name == "mixers" and hasattr(model, "mixers"))
        )
        if clashes:
            raise ValueError(
                f"hcpass cannot wrap {type(model).__name__}: its attribute(s) {clashes} clash "
                "with names the converted module needs"
            )
        # Not a child: the original parameters keep their state_dict names.
        object.__setattr__(self, "_model", model)
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in model.named_buffers(recurse=False):
            persistent = name not in model._non_persistent_buffers_set
            self.register_buffer(name, buf, persistent=persistent)
        self.mixers = nn.ModuleDict(mixers)
        self.report: Report = plan.report
        self._runs_per_forward = plan.runs
        self._key_of = {site.anchor: site.key for site in plan.sites}
        self._follows = {site.key: site.follows for site in plan.sites}
        self._label_of = {site.key: site.name for site in plan.sites}
        self._names_by_id: dict[int, str] = {}
        self._entry = fresh_trampoline("entry")
        self._probe = fresh_function(_tracing, "probe")
        self._eager = torch.compile(self._entry, backend=_eager_backend)
        self.graph_modules: list[fx.GraphModule] = []  # filled by hcpass.convert
        self.train(model.training)

    @property
    def original(self) -> nn.Module:
        """The original module (sharing parameters with this one)."""
        return self._model

    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten graph captured with the example inputs (the first, if Dynamo split
        the forward at graph breaks: see `graph_modules`)."""
        return self.graph_modules[0]

    def train(self, mode: bool = True) -> ConvertedModule:
        super().train(mode)
        self._model.training = mode  # the children are shared; the root flag is not
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.observed_forward(None, *args, **kwargs)

    @torch._dynamo.disable(recursive=False)
    def observed_forward(
        self, observer: TorchDispatchMode | None, *args: Any, **kwargs: Any
    ) -> Any:
        """forward, with `observer` active while the rewritten graphs run (eager only)."""
        run = _Run(self, observer=observer)
        token = _RUN.set(run)
        regions: list[str] = []
        try:
            with visible_residuals():
                if self._probe(self.mixers_anchor):
                    # An outer torch.compile is tracing: let it trace the original forward;
                    # the hcpass backend finds this module through the context variable.
                    out = self._entry(self._model, args, kwargs)
                elif regions := handoff.compiled_regions(self._model):
                    # Regional compile: under our own Dynamo run the regions would be inlined
                    # (not compiled). Run the code around them as plain Python instead; each
                    # region's graph goes to its backend, and chains cross between regions
                    # through hcpass.handoff.
                    out = self._model(*args, **kwargs)
                else:
                    with torch._dynamo.config.patch(recompile_limit=64):
                        out = self._eager(self._model, args, kwargs)
        finally:
            _RUN.reset(token)
        self._check_regions_ran(run, regions)
        self._check_ran(run)
        return out

    def _check_regions_ran(self, run: _Run, regions: list[str]) -> None:
        """With compiled regions, a site outside them runs without its mixer: an error."""
        if regions and run.mixers_ran < self._runs_per_forward:
            raise RuntimeError(
                f"hcpass: {run.mixers_ran} of {self._runs_per_forward} mixer runs happened "
                f"with compiled regions {regions}: each residual site must lie inside a "
                "region compiled with backend='hcpass' (a site outside them, or in a region "
                "compiled by another backend, runs without its mixer). Compile every block "
                "with backend='hcpass', or the whole model: "
                "torch.compile(converted, backend='hcpass')."
            )

    @property
    def mixers_anchor(self) -> torch.Tensor:
        return next(iter(self.mixers.values())).bias

    def _check_ran(self, run: _Run) -> None:
        if run.mixers_ran == 0 and self._runs_per_forward:
            raise RuntimeError(
                "hcpass: the forward ran without any mixer. Either the converted model was "
                "compiled with a backend other than 'hcpass' (only backend='hcpass' knows "
                "the mixers), or Dynamo fell back to eager (recompile limit)."
            )
        if run.mixers_ran < self._runs_per_forward:
            log.warning(
                "hcpass: %d of %d mixer runs happened in this forward; part of the model "
                "ran without its mixers (control flow changed, or Dynamo fell back to eager)",
                run.mixers_ran,
                self._runs_per_forward,
            )

    # -------------------------------------------------------------- used by the graphs
    def rewrite(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, MixedGraph]:
        """Rewrite a graph Dynamo captured from this module's forward.

        Returns the rewritten GraphModule and a callable running `fn(*inputs, *mixer
        params)`; the caller sets `MixedGraph.fn` (eager: the GraphModule itself)."""
        # Rebuilt per capture: parameters may have been replaced (load_state_dict(assign=True)).
        self._names_by_id = parameter_names(self._model)
        annotate_parameters(gm, self._names_by_id)
        graph, analysis = analyse(gm, keep=self._keep)
        slots = {site: self._slot(site.anchor_name) for site in analysis.sites}
        result = rewrite_chains(graph, analysis, slots, handoff=True)
        rewritten = fx.GraphModule(gm, graph, class_name="HcpassGraph")
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        index_of = {node.name: i for i, node in enumerate(placeholders)}
        anchors = tuple((index_of[m.anchor.name], m) for m in result.mixers)
        stream_inputs = tuple(
            handoff.StreamInput(index_of[x.name], index_of[site.anchor.name], slots[site].streams)
            for x, _, site in result.stream_inputs
        )
        stream_outputs = tuple(
            handoff.StreamOutput(position, index_of[site.anchor.name])
            for position, site in result.stream_outputs
        )
        mixed = MixedGraph(rewritten, anchors, result.sites, stream_inputs, stream_outputs)
        return rewritten, mixed

    def _keep(self, site) -> str | None:
        if site.anchor_name in self._key_of:
            return None
        return "no mixer: the site was not rewritten when the model was converted"

    def _slot(self, anchor: str) -> MixerSlot:
        key = self._key_of[anchor]
        mixer: Mixer = self.mixers[key]
        return MixerSlot(key, mixer.streams, mixer.spec, mixer.manifold.dynamic)

    def site_key(self, anchor: torch.Tensor) -> str:
        """The mixer key of the site whose mixer is keyed on the parameter `anchor`."""
        # Called per mixer per forward: scan the parameters again only on a miss.
        name = self._names_by_id.get(id(anchor))
        if name is None:
            self._names_by_id = parameter_names(self._model)
            name = self._names_by_id.get(id(anchor))
        key = self._key_of.get(name) if name is not None else None
        if key is None:
            raise RuntimeError(
                "hcpass: a rewritten graph was called with a parameter no mixer of this "
                "model is keyed on; call torch._dynamo.reset() and run again"
            )
        return key

    def follows(self, key: str) -> str | None:
        """The site before `key`'s in its planned chain (None where the chain starts)."""
        return self._follows[key]

    def site_label(self, key: str) -> str:
        return self._label_of[key]

    def mixer_parameters(self, anchor: torch.Tensor, inputs: MixerInputs) -> list[torch.Tensor]:
        """The parameters of the mixer keyed on `anchor`, checked against the graph's slot."""
        key = self.site_key(anchor)
        mixer: Mixer = self.mixers[key]
        if mixer.spec != inputs.slot.spec or mixer.channels != inputs.channels:
            raise RuntimeError(
                f"hcpass: mixer {key!r} ({mixer.spec}, C={mixer.channels}) differs from the "
                f"one the cached graph was built for ({inputs.slot.spec}, C={inputs.channels}); "
                "call torch._dynamo.reset() and run again"
            )
        if inputs.slot.dynamic:
            return [mixer.phi, mixer.alpha, mixer.bias]
        return [mixer.bias]


def _eager_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """The converted module's own runtime: rewrite, then run the rewritten graph eagerly.

    One module-level function, so Dynamo's per-backend cache entries don't multiply."""
    owner = current_owner()
    if owner is None:
        raise RuntimeError("hcpass: the runtime backend ran outside a converted forward")
    rewritten, mixed = owner.rewrite(gm)
    logs.rewritten_graph(rewritten, mixed, "hcpass eager runtime")
    return mixed


def _tracing(anchor: torch.Tensor) -> bool:
    """True under an outer torch.compile (Dynamo traces this and folds `is_compiling()` to
    True), False when run eagerly. The tensor argument keeps Dynamo from skipping the frame."""
    return torch.compiler.is_compiling()
