"""One forward call of a converted module, and the rewritten graphs it dispatches to.

Dynamo reuses a compiled graph for every module instance of the same class (parameters are
graph inputs), so a rewritten graph (`MixedGraph`) is told at call time which converted
module it runs for: the forward sets a `Run` in a context variable (`RUN`), and the graph takes the
mixers of that run's module (`Run.lookup`) and counts what ran, for the checks at the end of
the call (`hcpass.runtime.checks`).

A Dynamo backend that runs during a call (the lowering's ``hcpass`` backend, the runtime's
own eager one) asks the running module for what it needs through `Rewriter` only
(`current_rewriter`), never through the module itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import fx, nn
from torch._C._dynamo.eval_frame import reset_code
from torch.utils._python_dispatch import TorchDispatchMode

from hcpass.frontend.capture import fresh_function, fresh_trampoline
from hcpass.rewrite.base import MixerInputs
from hcpass.runtime import handoff
from hcpass.runtime.lookup import SiteLookup


class Rewriter(Protocol):
    """What a backend asks of the converted module whose forward is running: the rewrite of
    the graphs Dynamo captures from it (`hcpass.runtime.graphs.GraphRewriter`)."""

    # Equal for modules whose rewritten graphs are interchangeable.
    rewrite_key: Hashable

    def rewrite(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, MixedGraph]:
        """`gm` rewritten, and the call that runs it with the mixers (its `fn` the caller's:
        the rewritten GraphModule itself, or what a backend compiled of it)."""
        ...

    def rewrite_eagerly(
        self, gm: fx.GraphModule, where: str = ..., args: Sequence[Any] | None = None
    ) -> MixedGraph:
        """`gm` rewritten to run eagerly; `where` names the caller in the log. With `args`,
        its parameter placeholders are named from the tensors it is called with (a graph
        captured for another module, or by a backend that does not name them)."""
        ...

    def mixer_parameters(self, mixed: MixedGraph, args: Sequence[Any]) -> list[torch.Tensor]:
        """The mixer parameters `mixed` takes after `args` (the graph's inputs)."""
        ...


@dataclass
class Run:
    """One forward call of a ConvertedModule: what ran, checked against the plan at the end."""

    lookup: SiteLookup
    rewriter: Rewriter
    observer: TorchDispatchMode | None = None  # sees the mixer ops (hcpass.mixers)
    compiled: bool = False  # an outer torch.compile traced this forward
    graphs: int = 0  # rewritten graphs that ran
    mixers_ran: int = 0  # site executions
    keys: set[str] = field(default_factory=set)  # mixers that ran
    cuts: list[str] = field(default_factory=list)  # sites that restarted a planned chain
    notes: list[str] = field(default_factory=list)  # why a re-capture rewrote fewer sites
    handoffs: handoff.Handoffs = field(default_factory=handoff.Handoffs)


# The call running in this thread or task. Set and reset in the forward's own frame, which
# Dynamo skips: a helper function around it would be a frame for an outer compile to trace.
RUN: contextvars.ContextVar[Run | None] = contextvars.ContextVar("hcpass_run", default=None)


def current_rewriter() -> Rewriter | None:
    """The rewriter of the converted module whose forward is running (None outside one)."""
    run = RUN.get()
    return run.rewriter if run is not None else None


@dataclass(frozen=True)
class MixedGraph:
    """A rewritten graph as Dynamo calls it: appends the running module's mixer parameters."""

    fn: Callable[..., Any]
    mixer_inputs: tuple[tuple[int, MixerInputs], ...]  # (index of the anchor input, mixer)
    site_count: int
    # The graph as captured: Dynamo caches a graph per code object, so a frame resumed
    # after a graph break also runs it for plain instances of the converted model's class,
    # and for instances converted with other options (`rewrite_key`).
    captured: fx.GraphModule
    rewrite_key: Hashable  # of the converted module the graph was rewritten for
    notes: tuple[str, ...] = ()  # candidate adds this capture did not rewrite, and why
    # Anchor inputs of the first sites of chains that start inside the graph (expand).
    starts: tuple[int, ...] = ()
    # Chains crossing the graph's boundary with their n streams (hcpass.runtime.handoff).
    stream_inputs: tuple[handoff.StreamInput, ...] = ()
    stream_outputs: tuple[handoff.StreamOutput, ...] = ()
    dense: bool = False  # fn was compiled for contiguous n-stream inputs
    # rewrite_key -> this graph rewritten again, for modules converted with other options
    others: dict[Hashable, MixedGraph] = field(default_factory=dict, compare=False)

    @property
    def mixer_names(self) -> list[str]:
        return [inputs.slot.key for _, inputs in self.mixer_inputs]

    def __call__(self, *args: Any) -> Any:
        run = RUN.get()
        if run is None:
            return self.captured(*args)
        if run.rewriter.rewrite_key != self.rewrite_key:
            return self._rewritten_for(run.rewriter, args)(*args)
        params: list[torch.Tensor] = []
        for index, inputs in self.mixer_inputs:
            key, mixer_params = run.lookup.mixer_parameters(args[index], inputs)
            run.keys.add(key)
            params += mixer_params
        for index in self.starts:
            cut = run.lookup.restarted(args[index])
            if cut is not None and cut not in run.cuts:
                run.cuts.append(cut)
        states = handoff.enter(run.handoffs, run.lookup, self.stream_inputs, args, self.dense)
        run.graphs += 1
        run.mixers_ran += self.site_count
        run.notes += [note for note in self.notes if note not in run.notes]
        if run.observer is not None:
            with run.observer:
                result = self.fn(*args, *params, *states)
        else:
            result = self.fn(*args, *params, *states)
        return handoff.leave(run.handoffs, run.lookup, self.stream_outputs, args, result)

    def _rewritten_for(self, rewriter: Rewriter, args: Sequence[Any]) -> MixedGraph:
        """The captured graph rewritten by `rewriter`, of a module converted with other
        options than the module this graph was rewritten for (Dynamo shares the frames
        resumed after a graph break between all instances of a class); runs eagerly, like
        the lowering's `PlainGraph`."""
        mixed = self.others.get(rewriter.rewrite_key)
        if mixed is None:
            captured = fx.GraphModule(self.captured, copy.deepcopy(self.captured.graph))
            mixed = self.others[rewriter.rewrite_key] = rewriter.rewrite_eagerly(
                captured, "hcpass eager runtime", args
            )
        return mixed


class Entries:
    """A converted module's ways into Dynamo, each a code object of its own (a Dynamo cache
    of its own): `entry` for an outer torch.compile to trace, `eager` for the runtime's own
    compile with `backend`, `probe` (`tracing`) to tell the two apart.

    One trampoline for an outer torch.compile, one for the eager runtime: Dynamo keeps a code
    object's graphs for every backend in one cache, so shared, calls that alternate between
    the two (and between train/eval, grad modes) would reach its recompile limit twice as
    fast."""

    def __init__(self, backend: Callable[..., Any]) -> None:
        self.entry = fresh_trampoline("entry")
        self._eager_entry = fresh_trampoline("eager_entry")
        self.probe = fresh_function(tracing, "probe")
        self.eager = torch.compile(self._eager_entry, backend=backend)

    def release(self) -> None:
        """Drop Dynamo's state for these code objects (cache entries, the skip mark a failed
        trace leaves): it cannot be cleared per instance, so a module gets new `Entries`."""
        for fn in (self.entry, self._eager_entry, self.probe):
            reset_code(fn.__code__)


def has_dtensor_parameters(model: nn.Module) -> bool:
    """Whether `model` holds DTensor parameters (tensor parallel, FSDP2).

    torch 2.13 cannot compile the backward of such a model at symbolic sizes, converted or
    not: a DTensor view's saved size is a SymInt the tracer never saw, and tracing
    ``sym_max(s, 1)``, which returns that SymInt itself, gives it itself as its definition
    (RecursionError in proxy_tensor's ``_compute_proxy``). With static sizes there is none."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def dynamo_settings(**settings: Any) -> Iterator[None]:
    """``torch._dynamo.config.patch(**settings)``, for every forward: it sets (and restores)
    only the settings that differ. A patch costs ~30 µs on entry and exit; a decoding step of
    a small model is ~1.5 ms."""
    config = torch._dynamo.config
    changed = {}
    for name, value in settings.items():
        previous = getattr(config, name)
        if previous != value:
            changed[name] = previous
            setattr(config, name, value)
    try:
        yield
    finally:
        for name, previous in changed.items():
            setattr(config, name, previous)


def tracing(anchor: torch.Tensor) -> bool:
    """True under an outer torch.compile (Dynamo traces this and folds the call to True),
    False when run eagerly, whatever another thread compiles meanwhile: unlike
    `torch.compiler.is_compiling()`, a process-wide flag. The tensor argument keeps Dynamo
    from skipping the frame."""
    return torch.compiler.is_dynamo_compiling()
