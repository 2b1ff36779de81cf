"""``torch.export.export(converted, ...)``: the converted forward as one ATen program.

The converted forward normally runs the original model under Dynamo and rewrites each graph
Dynamo captures (`hcpass.runtime.module`). torch.export traces a module's forward in Python
(non-strict) with fake tensors, and refuses the ``torch.compiler.disable`` that keeps an
outer trace out of the eager runtime. So under export the converted forward calls
`trace_for_export` instead: it runs the same capture and rewrite inside the export's trace,
the way torch's higher-order ops (flex_attention, cond) compile a function there -- the
export's pre-dispatch and metadata torch-function modes are lifted while Dynamo captures, and
re-entered while the rewritten graph runs, so the export records the rewritten graph's ops
on its own (symbolic) tensors. Parameters and mixers are the export's lifted parameters;
batch and sequence dimensions stay as symbolic as the export's ``dynamic_shapes`` make them.

The mixer ops are recorded decomposed to ATen ops (`ATEN`): the program runs, saves, loads and
compiles (AOTInductor, ExecuTorch) without hcpass. Sinkhorn's iterations are unrolled
(`hcpass.manifolds.sinkhorn`, under ``torch.compiler.is_exporting()``).

Strict export (``strict=True``) traces the forward with Dynamo itself, and a Dynamo trace
cannot run the capture and rewrite. There the forward records one call of `_strict_call`
(``allow_in_graph``: Dynamo puts the call in its graph and runs it on fake tensors for the
outputs' shapes), taking the inputs and the module's parameters and buffers as tensors; when
the export then traces Dynamo's graph to ATen, the call runs the non-strict path above with
the module reparametrized by those tensors. (torch's ``nonstrict_trace``, made for this, fails
in strict export in torch 2.13: ``cannot create weak reference to 'TreeSpec' object``.)

One graph only: a graph break would hand n-stream states across Python code through the
runtime's tensor bookkeeping (`hcpass.runtime.handoff`), which fake tensors cannot key, so
the capture is ``fullgraph`` and a break is an error naming where Dynamo broke the graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import fx
from torch._C._dynamo.eval_frame import reset_code
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.utils import _pytree as pytree

from hcpass.frontend.capture import fresh_trampoline, visible_residuals
from hcpass.ops import reference
from hcpass.ops.attnres import reference as attnres_reference
from hcpass.rewrite.regions import checkpoint_eagerly

if TYPE_CHECKING:
    from hcpass.runtime.module import ConvertedModule

# Each mixer op -> the plain-PyTorch reference the exported program records in its place.
ATEN: dict[Any, Callable[..., Any]] = {
    torch.ops.hcpass.coeffs.default: reference.coeffs,
    torch.ops.hcpass.pre.default: reference.pre,
    torch.ops.hcpass.post_res.default: reference.post_res,
    torch.ops.hcpass.attnres.default: attnres_reference.attnres,
}


def trace_for_export(owner: ConvertedModule, args: tuple, kwargs: dict[str, Any]) -> Any:
    """Run `owner`'s original model under Dynamo inside the running torch.export trace, each
    captured graph rewritten with `owner`'s mixers and its mixer ops decomposed."""
    if owner.report.graph_breaks:  # as captured by convert
        raise _graph_break_error(owner, "\n".join(owner.report.graph_breaks))
    trampoline = fresh_trampoline("export")  # a fresh code object: no Dynamo cache to share
    try:
        with _compile_inside_export() as modes, visible_residuals():
            backend = _backend(owner, modes)
            compiled = torch.compile(trampoline, backend=backend, fullgraph=True)
            try:
                return compiled(owner.original, args, kwargs)
            except torch._dynamo.exc.Unsupported as error:
                raise _graph_break_error(owner, str(error)) from error
    finally:
        reset_code(trampoline.__code__)


# Converted modules by id, and the output structure of each one's last strict-export call:
# `_strict_call` takes only tensors and constants.
_MODULES: weakref.WeakValueDictionary[int, ConvertedModule] = weakref.WeakValueDictionary()
_OUTPUT_SPECS: dict[int, pytree.TreeSpec] = {}


def register(owner: ConvertedModule) -> None:
    """Make `owner` reachable from a strict export's traced call."""
    _MODULES[id(owner)] = owner


def strict_export_forward(owner: ConvertedModule, args: tuple, kwargs: dict[str, Any]) -> Any:
    """The converted forward as strict export's Dynamo traces it: one `_strict_call`."""
    named = [*owner.named_parameters(), *owner.named_buffers()]
    names = tuple(name for name, _ in named)
    key = id(owner)
    tensors = [tensor for _, tensor in named]
    flat = _strict_call(key, len(args), tuple(kwargs), names, *args, *kwargs.values(), *tensors)
    return pytree.tree_unflatten(list(flat), _OUTPUT_SPECS[key])


@torch._dynamo.allow_in_graph
def _strict_call(
    key: int, positional: int, keywords: tuple[str, ...], names: tuple[str, ...], *flat: Any
) -> tuple[Any, ...]:
    """The forward of converted module `key` on ``args = flat[:positional]``, then the
    `keywords` arguments, with its parameters and buffers `names` taken from the rest of
    `flat`; returns the outputs' leaves (their structure: `_OUTPUT_SPECS`)."""
    owner = _MODULES[key]
    count = len(flat) - len(names)
    inputs, state = flat[:count], dict(zip(names, flat[count:], strict=True))
    args, kwargs = tuple(inputs[:positional]), dict(zip(keywords, inputs[positional:], strict=True))
    # Dynamo runs this on its fake tensors for the outputs' shapes (no proxy mode then), which
    # the mixers do not change: the original model gives them without a nested Dynamo run.
    shapes_only = get_proxy_mode() is None
    with torch.nn.utils.stateless._reparametrize_module(owner, state, tie_weights=True):
        out = owner.exported_forward(args, kwargs, shapes_only=shapes_only)
    leaves, _OUTPUT_SPECS[key] = pytree.tree_flatten(out)
    return tuple(leaves)


def _backend(
    owner: ConvertedModule, modes: Sequence[torch.overrides.TorchFunctionMode]
) -> Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]:
    """The Dynamo backend of one export: rewrite, decompose the mixer ops, and run the
    rewritten graph with the export's torch-function modes back on."""

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        rewritten, mixed = owner.rewrite(gm)
        if mixed.stream_outputs:
            # A chain's n streams returned for the graph after a break: there is none.
            output = rewritten.graph.output_node()
            values = output.args[0]
            output.args = (type(values)(values[: -len(mixed.stream_outputs)]),)
            mixed = dataclasses.replace(mixed, stream_outputs=())
        for module in rewritten.modules():  # checkpoint bodies hold mixer ops too
            if isinstance(module, fx.GraphModule):
                decompose_mixer_ops(module.graph)
                checkpoint_eagerly(module.graph)
                module.recompile()

        def run(*inputs: Any) -> Any:
            with contextlib.ExitStack() as stack:
                for mode in modes:
                    stack.enter_context(mode)
                return mixed(*inputs)

        return run

    return backend


def decompose_mixer_ops(graph: fx.Graph) -> None:
    """Replace every mixer op call in `graph` by its plain-PyTorch reference (`ATEN`)."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target in ATEN:
            node.target = ATEN[node.target]


@contextlib.contextmanager
def _compile_inside_export() -> Iterator[list[torch.overrides.TorchFunctionMode]]:
    """What ``torch._higher_order_ops.utils.setup_compilation_env`` does for a higher-order
    op that compiles a function inside an export (torch 2.13): mark the compile as nested in
    a trace (else Dynamo skips it and runs the forward as plain Python: the original model,
    without mixers), and lift the export's pre-dispatch and metadata torch-function modes
    while Dynamo traces. Yields the lifted modes, to re-enter around the compiled call."""
    from torch._higher_order_ops.utils import (
        _hop_compile_tls,
        _set_compilation_env,
        _temp_remove_metadata_torch_function_mode,
    )
    from torch.fx.experimental.proxy_tensor import _temp_remove_pre_dispatch_torch_function_mode

    nested = getattr(_hop_compile_tls, "in_hop_compile", False)
    _hop_compile_tls.in_hop_compile = True
    try:
        with (
            _set_compilation_env(),
            torch._dynamo.utils.disable_cache_limit(),
            _temp_remove_pre_dispatch_torch_function_mode() as pre_dispatch,
            _temp_remove_metadata_torch_function_mode() as metadata,
        ):
            yield [mode for mode in (pre_dispatch, metadata) if mode is not None]
    finally:
        _hop_compile_tls.in_hop_compile = nested


def _graph_break_error(owner: ConvertedModule, detail: str) -> RuntimeError:
    name = type(owner.original).__name__
    return RuntimeError(
        f"hcpass: torch.export of the converted {name} needs its forward captured as one "
        "graph, and Dynamo breaks the graph (the residual chains' n streams cannot be "
        f"handed across a graph break in an exported program):\n{detail}\n"
        "Remove the graph break from the forward (print, .item(), data-dependent Python "
        "control flow, an unsupported call: `torch._dynamo.explain(converted.original)(...)` "
        "lists them); the converted model itself runs with graph breaks, eagerly and under "
        "torch.compile(..., backend='hcpass')."
    )
