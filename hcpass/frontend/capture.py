"""Capture a model's forward as Dynamo graphs, the way torch.compile sees it.

Dynamo is the only capture that takes HF transformers models untouched (torch.export and
fx.symbolic_trace fail on GPT-2/Llama). Each capture goes through a trampoline with a code
object of its own, so it neither hits nor fills the cache of the model's own forward (Dynamo
keeps at most `recompile_limit` entries per code object and silently runs eager past that).
The frames Dynamo compiles on their own after a graph break (the model's forward, its resume
functions) are shared by every capture and every instance of the class: one module-level
backend (`_record`) keeps their cache at one entry per guard set however many captures run.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import itertools
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

_counter = itertools.count()

# Dynamo settings of every graph hcpass captures, at `convert` and at each call of a
# converted model. A forward inside an activation-checkpoint region may change Python state
# that lives outside it -- with transformers >= 5.25, which brings `kernels`, every attention
# layer sets and resets a module-level variable (`kernels.use_kernelized_func`). By default
# Dynamo ends the graph there (eager checkpointing would replay the change when the backward
# recomputes the region), and no residual chain crosses a graph break. Like torch.compile
# with this flag, hcpass applies such changes once, in the forward (docs/limitations.md).
CAPTURE_SETTINGS: dict[str, Any] = {"skip_fwd_side_effects_in_bwd_under_checkpoint": True}


Layout = tuple[Any, int, tuple[int, ...], tuple[int, ...], torch.dtype, torch.device, int]


def layout(t: torch.Tensor) -> Layout:
    """What makes two tensors hold the same values: the same memory, read the same way, and
    not written to in between (views share their base's version counter). A tensor subclass
    that wraps others (DTensor: its local shard) has no memory of its own: its memory is
    theirs."""
    if is_traceable_wrapper_subclass(t):
        inner = [getattr(t, name) for name in t.__tensor_flatten__()[0]]
        memory: Any = (type(t), tuple(layout(x) for x in inner if isinstance(x, torch.Tensor)))
        offset = 0
    else:
        memory, offset = t.untyped_storage().data_ptr(), t.storage_offset()
    return (
        memory,
        offset,
        tuple(t.shape),
        t.stride(),
        t.dtype,
        t.device,
        t._version,
    )


def _call(self: nn.Module, args: tuple, kwargs: dict) -> Any:
    # Named `self` so Dynamo's module paths read ``L['self'].h.0`` as for a compiled module.
    return self(*args, **kwargs)


def fresh_function(fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
    """`fn` with a code object of its own, hence a Dynamo cache of its own."""
    name = f"hcpass_{tag}_{next(_counter)}"
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name)


def fresh_trampoline(tag: str) -> Callable[[nn.Module, tuple, dict], Any]:
    """``lambda module, args, kwargs: module(*args, **kwargs)`` with a cache of its own."""
    return fresh_function(_call, tag)


@dataclass(frozen=True)
class CapturedGraph:
    gm: fx.GraphModule
    index: int  # order in which the forward reached it
    graph_break: str | None  # why Dynamo ended this graph early, if it did
    # input position -> (graph index, output position): inputs that an earlier call returned
    # (the tensor itself, or a view of it with the same layout and version)
    inputs_from: dict[int, tuple[int, int]] = field(default_factory=dict)


def capture(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> list[CapturedGraph]:
    """Run `model` once under Dynamo (RNG and buffers restored) and return its graphs, one
    per call, parameter placeholders annotated with the names of the parameters passed."""
    return capture_and_run(model, args, kwargs)[0]


# Runs one call of a captured graph: (the call's record, parameters named; the graph Dynamo
# compiled; the call's arguments) -> the graph's outputs.
GraphRunner = Callable[[CapturedGraph, fx.GraphModule, tuple[Any, ...]], Any]


def _run_graph(captured: CapturedGraph, gm: fx.GraphModule, args: tuple[Any, ...]) -> Any:
    return gm.forward(*args)


def capture_and_run(
    model: nn.Module,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    run: GraphRunner = _run_graph,
) -> tuple[list[CapturedGraph], Any]:
    """`capture`, with each graph call run by `run` (an interpreter that measures, say), and
    the model's output."""
    calls = _Calls(parameter_names(model), run)
    compiled = torch.compile(fresh_trampoline("capture"), backend=_record)
    token = _CAPTURING.set(calls)
    try:
        with (
            side_effect_free(model),
            torch._dynamo.config.patch(recompile_limit=64, **CAPTURE_SETTINGS),
        ):
            output = compiled(model, tuple(args), dict(kwargs))
    finally:
        _CAPTURING.reset(token)
    return calls.graphs, output


def _record(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """The capture backend. Dynamo reuses what it returns for any later capture that reaches
    the same frame with inputs passing its guards, so the call records into the capture
    running then."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    broke = None
    if reason and reason.graph_break:
        broke = reason.reason.strip().splitlines()[0]
        if reason.user_stack:  # innermost frame last: the line Dynamo broke at
            frame = reason.user_stack[-1]
            broke += f" at {frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return functools.partial(_record_call, gm, broke)


def _record_call(gm: fx.GraphModule, graph_break: str | None, *args: Any) -> Any:
    calls = _CAPTURING.get()
    if calls is None:
        raise RuntimeError("hcpass: a captured graph ran outside hcpass's capture")
    return calls.run(gm, graph_break, *args)


class _Calls:
    """Records each call of a captured graph as a `CapturedGraph` of its own.

    Dynamo reuses one graph for every instance of a module class (parameters are inputs):
    when a graph break in the model's forward makes each block its own frame, one graph runs
    once per block, and each call has its own parameters, hence its own sites. Each call also
    records which inputs an earlier call returned (`CapturedGraph.inputs_from`)."""

    def __init__(self, names: dict[int, str], run: GraphRunner) -> None:
        self.names = names
        self.run_graph = run
        self.graphs: list[CapturedGraph] = []
        # layout of each tensor a call returned -> (graph index, output position); outputs
        # are held until the capture ends, so their memory is not reused by other tensors.
        self.returned: dict[Layout, tuple[int, int]] = {}
        self.held: list[Any] = []

    def run(self, gm: fx.GraphModule, graph_break: str | None, *args: Any) -> Any:
        called = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        annotate_call(called, args, self.names)
        captured = CapturedGraph(called, len(self.graphs), graph_break)
        self.graphs.append(captured)
        for i, arg in enumerate(args):
            if isinstance(arg, torch.Tensor) and layout(arg) in self.returned:
                captured.inputs_from[i] = self.returned[layout(arg)]
        outputs = self.run_graph(captured, gm, args)
        self.held.append(outputs)
        for i, out in enumerate(outputs):
            if isinstance(out, torch.Tensor):
                self.returned.setdefault(layout(out), (captured.index, i))
        return outputs


# The capture running in this thread (`capture`), which graphs Dynamo runs record into.
_CAPTURING: contextvars.ContextVar[_Calls | None] = contextvars.ContextVar(
    "hcpass_capturing", default=None
)


def annotate_call(gm: fx.GraphModule, args: Sequence[Any], names: dict[int, str]) -> None:
    """Name each parameter placeholder after the parameter this call passes it."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, arg in zip(placeholders, args, strict=True):
        name = names.get(id(arg)) if isinstance(arg, nn.Parameter) else None
        if name is not None:
            node.meta[PARAMETER] = name


@contextlib.contextmanager
def visible_residuals():
    """Keep residual adds in the graph: under no_grad in eval mode nn.TransformerEncoderLayer
    and nn.MultiheadAttention take a fused fast path (one op with the residuals inside)."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@contextlib.contextmanager
def side_effect_free(model: nn.Module):
    """Run `model` for inspection: its buffers (BatchNorm statistics) and the RNG state are
    as before afterwards. Grad stays enabled: models may take other paths without it."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        with torch.random.fork_rng(), visible_residuals():
            yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])


PARAMETER = "hcpass_parameter"  # node.meta key: the parameter a placeholder was lifted from


def annotate_parameters(gm: fx.GraphModule, names: dict[int, str] | None) -> None:
    """Record on each parameter placeholder the name of the parameter it was lifted from.

    Called inside a backend: Dynamo drops the placeholders' `grapharg` (which holds the
    real tensor) once the backend returns. Names come from the tensor's identity, which
    stays right when Dynamo compiles an inner frame (after a graph break) whose source
    paths are relative to a submodule; with `names=None` Dynamo's source expression is used.
    """
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        grapharg = node.meta.get("grapharg")
        example = getattr(grapharg, "example", None) if grapharg is not None else None
        if isinstance(example, nn.Parameter):
            name = grapharg.source.name if names is None else names.get(id(example))
            if name is not None:
                node.meta[PARAMETER] = name


def unwrapped_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """`model`'s parameters named as the unwrapped model spells them: a submodule compiled
    and assigned back (``torch.compile(block)``) adds ``_orig_mod.`` to its names."""
    for name, p in model.named_parameters(remove_duplicate=False):
        yield name.replace("._orig_mod.", ".").removeprefix("_orig_mod."), p


def parameter_names(model: nn.Module) -> dict[int, str]:
    """Parameter names by tensor identity (`unwrapped_parameters`)."""
    return {id(p): name for name, p in unwrapped_parameters(model)}


def parameter_name(node: fx.Node) -> str | None:
    return node.meta.get(PARAMETER)
