"""The module `hcpass.convert` returns: the ``nn.Module`` face of a converted model.

A `ConvertedModule` owns the original model's parameters under their original names plus
``mixers.<site>``, and passes what it lacks through to the original. Its forward runs the
original model under Dynamo; each call is a `hcpass.runtime.call.Run`, every graph Dynamo
captures is rewritten by `hcpass.runtime.graphs` and finds its mixers through
`hcpass.runtime.lookup`, and `hcpass.runtime.checks` checks the call against the plan.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from hcpass.frontend.capture import (
    CAPTURE_SETTINGS,
    CapturedGraph,
    visible_residuals,
)
from hcpass.frontend.plan import Plan, Report
from hcpass.runtime import checks, export, handoff
from hcpass.runtime.call import (
    RUN,
    Entries,
    MixedGraph,
    Run,
    dynamo_settings,
    has_dtensor_parameters,
)
from hcpass.runtime.families import Family
from hcpass.runtime.graphs import GraphRewriter, eager_backend
from hcpass.runtime.lookup import SiteLookup
from hcpass.runtime.mixer import SiteModule
from hcpass.runtime.proxy import FromOriginal, converted_class, encoder_decoder_generate

# What the converted module registers of the original root, and keeps in sync with it.
_ROOT_KINDS = ("_parameters", "_buffers", "_modules")

# Rebuilt, never pickled or copied: each holds Dynamo state tied to its code object.
_RUNTIME_STATE = ("_entries",)


class ConvertedModule(nn.Module, metaclass=FromOriginal):
    """`model` with its residual chains widened to n streams (see `hcpass.convert`).

    An instance's class is a subclass made per original class (``ConvertedGPT2LMHeadModel``)
    whose ``forward`` has the original's signature. Attributes the module does not have
    (``config``, ``generate``, ...) are looked up on the original model, its methods bound
    to this module, so ``self(...)`` inside them (HF ``generate``) runs the converted forward.
    """

    def __new__(cls, model: nn.Module, *args: Any, **kwargs: Any) -> ConvertedModule:
        if cls is ConvertedModule:
            cls = converted_class(ConvertedModule, type(model))
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        plan: Plan,
        mixers: dict[str, SiteModule],
        family: Family[Any],
        options: Any,
        graphs: Sequence[CapturedGraph] = (),
    ) -> None:
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
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in model.named_buffers(recurse=False):
            persistent = name not in model._non_persistent_buffers_set
            self.register_buffer(name, buf, persistent=persistent)
        # Not a child: the original parameters keep their state_dict names. Set after the
        # registrations above, which must not see the original's attributes (`__getattr__`).
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_root_synced", {})
        self._sync_root()  # both sides hold the same objects: the first snapshot
        self.mixers = nn.ModuleDict(mixers)
        object.__setattr__(self, "_family", family)
        object.__setattr__(self, "_family_options", options)
        self.report: Report = plan.report
        object.__setattr__(self, "_lookup", SiteLookup(plan, model, self.mixers))
        object.__setattr__(
            self, "_rewriter", GraphRewriter(model, self._lookup, mixers, family, options)
        )
        self._fresh_runtime()
        # What one forward runs, as captured with the example inputs.
        self.graph_modules: list[fx.GraphModule] = [self.rewrite(g.gm)[0] for g in graphs]
        self.train(model.training)

    @torch._dynamo.disable
    def _fresh_runtime(self) -> None:
        """New trampolines: Dynamo's state for a code object (cache entries, the skip mark
        a failed trace leaves) cannot be cleared per instance, but a new code object has none."""
        if "_entries" in self.__dict__:
            self._entries.release()
        self._lookup.forget_parameters()
        export.register(self)
        object.__setattr__(self, "_entries", Entries(eager_backend))

    def __reduce_ex__(self, protocol: int) -> tuple:
        return _unpickle, (type(self._model),), self.__getstate__()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in _RUNTIME_STATE:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fresh_runtime()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_model")
            if model is None or name.startswith("__"):
                raise
        if name == "generate" and getattr(getattr(model, "config", None), "is_encoder_decoder", 0):
            return functools.partial(encoder_decoder_generate, type(model).__name__)
        value = getattr(model, name)
        if isinstance(value, types.MethodType) and value.__self__ is model:
            return types.MethodType(value.__func__, self)
        return value

    def _sync_root(self) -> None:
        """Make this module's root parameters, buffers and children, and the original's,
        the same objects again after either side replaced one: the forward runs the
        original, while `parameters()`, `state_dict()` and the optimizer see this module's.

        Replacements come from setattr (``load_state_dict(assign=True)``, a new head),
        `_apply` (``.to(dtype)`` replaces buffers; ``to_empty`` parameters too) and writes
        into the dicts (``quantize_dynamic``). Whichever side changed since the last sync
        wins."""
        synced = self._root_synced
        for kind in _ROOT_KINDS:
            here, there = self.__dict__[kind], self._model.__dict__[kind]
            for name in list(there):
                mine, theirs = here.get(name), there[name]
                if mine is not theirs:
                    if synced.get((kind, name)) is theirs:
                        there[name] = mine
                    else:
                        here[name] = theirs
                synced[(kind, name)] = here[name]

    @property
    def original(self) -> nn.Module:
        """The original module (sharing parameters with this one). Calling it, or methods
        of it such as ``generate``, runs the model without the mixers."""
        self._sync_root()
        return self._model

    @property
    def family(self) -> Family[Any]:
        """The rewrite family the model was converted with (`hcpass.runtime.families`)."""
        return self._family

    @property
    def family_options(self) -> Any:
        """That family's options (`Family.options`), as `convert` was given them."""
        return self._family_options

    def follows(self, key: str) -> str | None:
        """The site before `key`'s in its planned chain (None where the chain starts)."""
        return self._lookup.follows(key)

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
        if torch.compiler.is_exporting():
            if torch.compiler.is_dynamo_compiling():  # strict export
                return export.strict_export_forward(self, args, kwargs)
            return self.exported_forward(args, kwargs)
        return self.observed_forward(None, *args, **kwargs)

    def exported_forward(
        self, args: tuple, kwargs: dict[str, Any], *, shapes_only: bool = False
    ) -> Any:
        """forward under torch.export: the capture and rewrite run inside the export's trace
        (`hcpass.runtime.export`), which records the rewritten graph with the mixer ops
        decomposed to ATen. Checked against the plan like every call. `shapes_only`: the
        original model's forward instead (same output structure, shapes and dtypes)."""
        # The root entries are the export's lifted tensors now: the original's forward must
        # read them during the trace, and its own entries come back afterwards (the export
        # restores this module's only).
        original = {kind: dict(self._model.__dict__[kind]) for kind in _ROOT_KINDS}
        synced = dict(self._root_synced)
        self._sync_root()
        run = Run(self._lookup, self._rewriter)
        token = RUN.set(run)
        try:
            if shapes_only:
                return self._model(*args, **kwargs)
            out = export.trace_for_export(self, args, kwargs)
        finally:
            RUN.reset(token)
            for kind, entries in original.items():
                self._model.__dict__[kind].update(entries)
            self._root_synced.clear()
            self._root_synced.update(synced)
        checks.check_ran(run, type(self._model).__name__)
        return out

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """HF models' switch (the HF `Trainer` calls it): checkpoints the original blocks;
        their sites are rewritten inside the checkpoint regions (`hcpass.rewrite.regions`).

        Called on the original, not through the attribute fall-through: bound to this module,
        HF's method would walk `self.modules()`, which lacks the original root, and set its
        flags here, where the original's forward never reads them."""
        self._model.gradient_checkpointing_enable(*args, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self._model.gradient_checkpointing_disable()

    @torch._dynamo.disable(recursive=False)
    def observed_forward(
        self, observer: TorchDispatchMode | None, *args: Any, **kwargs: Any
    ) -> Any:
        """forward, with `observer` active while the rewritten graphs run (eager only)."""
        if torch._C._functorch.peek_interpreter_stack() is not None:
            # Checked before Dynamo starts: it would mark the model's forward (shared by
            # every instance of its class) to run uncompiled for good.
            raise RuntimeError(
                "hcpass: a converted model cannot run inside a torch.func transform (grad, "
                "vjp, jacrev, vmap, ...) called eagerly: its forward runs Dynamo, which does "
                "not trace from inside one. Use torch.autograd (loss.backward(), "
                "torch.autograd.grad) and batched inputs"
            )
        self._sync_root()
        run = Run(self._lookup, self._rewriter, observer=observer)
        token = RUN.set(run)
        regions: list[str] = []
        try:
            # Under DDP, Dynamo splits a graph at gradient-bucket boundaries and hands the
            # backend each piece (DDPOptimizer): a chain's sites, and the parameters that key
            # their mixers, would fall in different pieces. One graph per frame instead.
            # And Dynamo guards on the modules' hooks: by default it does not, so a hook
            # registered after the first call would never run.
            with (
                visible_residuals(),
                dynamo_settings(
                    optimize_ddp=False, skip_nnmodule_hook_guards=False, **CAPTURE_SETTINGS
                ),
            ):
                run.compiled = self._entries.probe(self.mixers_anchor)
                if run.compiled:
                    # An outer torch.compile is tracing: let it trace the original forward;
                    # the hcpass backend finds this module through the context variable.
                    # A model with DTensor parameters recompiles each new input shape with
                    # static sizes (`has_dtensor_parameters`).
                    static = has_dtensor_parameters(self._model)
                    with dynamo_settings(**({"automatic_dynamic_shapes": False} if static else {})):
                        out = self._entries.entry(self._model, args, kwargs)
                elif regions := handoff.compiled_regions(self._model):
                    # Regional compile: under our own Dynamo run the regions would be inlined
                    # (not compiled). Run the code around them as plain Python instead; each
                    # region's graph goes to its backend, and chains cross between regions
                    # through hcpass.runtime.handoff.
                    out = self._model(*args, **kwargs)
                else:
                    with dynamo_settings(recompile_limit=64):
                        out = self._entries.eager(self._model, args, kwargs)
        except BaseException:
            self._fresh_runtime()
            raise
        finally:
            RUN.reset(token)
        checks.check_regions_ran(run, regions)
        checks.check_ran(run, type(self._model).__name__)
        return out

    @property
    def mixers_anchor(self) -> torch.Tensor:
        return next(self.mixers.parameters())

    def rewrite(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, MixedGraph]:
        """A graph Dynamo captured from this module's forward, rewritten with its mixers
        (`hcpass.runtime.graphs.GraphRewriter.rewrite`)."""
        return self._rewriter.rewrite(gm)


def _unpickle(original: type[nn.Module]) -> ConvertedModule:
    return object.__new__(converted_class(ConvertedModule, original))
