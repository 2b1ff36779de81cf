"""``torch.compile(..., backend="hcpass")`` (registered through the torch_dynamo_backends
entry point).

- Under a `ConvertedModule`'s forward, each graph is rewritten with that module's mixers
  (asked of the running call's `hcpass.runtime.call.Rewriter`, never of the module) and
  lowered: on CPU the mixer ops become their references and Inductor fuses them into
  C++; on CUDA they stay ``hcpass::`` ops whose CUDA kernels are the generated Triton kernels,
  and the boundaries between consecutive sites are fused into one op (`FuseAcrossSites`).
- Anywhere else (a model that was never converted) the graph is compiled unchanged by
  Inductor; one log line says how many residual sites there are and that `hcpass.convert`
  adds the mixers. The backend never creates parameters: an optimizer could not see them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from hcpass import logs
from hcpass.frontend.capture import annotate_parameters
from hcpass.frontend.plan import analyse
from hcpass.lowering.passes import NO_PASSES, PassPlan, pass_plan
from hcpass.runtime import handoff
from hcpass.runtime.call import MixedGraph, current_rewriter

log = logging.getLogger("hcpass")


def _compile_fx(
    gm: fx.GraphModule, example_inputs: Sequence[Any], passes: PassPlan
) -> Callable[..., Any]:
    """Inductor on `gm` with the joint and post-grad passes of `passes` (the pre-Inductor
    ones have run)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs), config_patches=passes.inductor_config())


def _on_cuda(example_inputs: Sequence[Any]) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def _lower_and_compile(rewritten: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """Lower `rewritten` and compile it. On CPU, if Inductor fails on the graph with shared
    subgraphs, compile it again with every site inlined: sharing only saves compile time,
    and torch 2.13's partitioner of a shared subgraph can fail where the inlined graph
    compiles (under dynamic shapes, a size it reads from a tangent: "Node ... was invalid,
    but is output")."""
    cuda = _on_cuda(example_inputs)
    # a copy before lowering edits the graph and its checkpoint bodies in place
    inlined = None if cuda else copy.deepcopy(rewritten)
    passes = pass_plan(cuda)
    passes.lower(rewritten.graph)
    rewritten.recompile()
    try:
        return _compile_fx(rewritten, example_inputs, passes)
    except Exception as error:
        # Dynamo's own exceptions are signals (restart the trace, skip the frame), not
        # failures of the shared form; Inductor's errors (InductorError, a subclass) are
        # such failures: its wrapper of a shared subgraph whose sizes are expressions of
        # the graph's symbols (ViT's (H//p)*(W//p)+1 tokens) fails to bind those symbols.
        signal = isinstance(error, torch._dynamo.exc.TorchDynamoException) and not isinstance(
            error, torch._dynamo.exc.BackendCompilerFailed
        )
        if signal or inlined is None or not _has_shared_subgraphs(rewritten):
            raise
        log.warning(
            "hcpass: Inductor could not compile this graph with its sites' mixer work in "
            "shared subgraphs (%s: %s); compiling it with every site inlined instead "
            "(same results, a longer cold compile)",
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
        )
    passes = pass_plan(cuda, share=False)
    passes.lower(inlined.graph)
    inlined.recompile()
    return _compile_fx(inlined, example_inputs, passes)


def _has_shared_subgraphs(gm: fx.GraphModule) -> bool:
    return any(
        m.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_subgraph)
        for m in gm.modules()  # checkpoint bodies too
        if isinstance(m, fx.GraphModule)
    )


def hcpass_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **options: Any) -> Callable:
    given = options.get("options", options)  # torch.compile(options=...) arrives as one kwarg
    if given:
        raise ValueError(
            f"backend='hcpass' takes no options, got {sorted(given)}; streams and manifold "
            "are chosen by hcpass.convert(model, example_inputs, streams=..., manifold=...)"
        )
    rewriter = current_rewriter()
    if rewriter is None:
        _log_plain_model(gm)
        captured = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # Inductor edits gm in place
        for node in captured.graph.nodes:
            node.meta.pop("grapharg", None)  # its weak reference dies when this returns
        return PlainGraph(captured, _compile_fx(gm, example_inputs, NO_PASSES))
    rewritten, mixed = rewriter.rewrite(gm)
    logs.rewritten_graph(rewritten, mixed.mixer_names, mixed.site_count, "hcpass backend")
    mixer_params = rewriter.mixer_parameters(mixed, example_inputs)
    traced = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
    states = handoff.examples(mixed.stream_inputs, traced)
    compiled = _lower_and_compile(rewritten, [*example_inputs, *mixer_params, *states])
    return replace(mixed, fn=compiled, dense=True)


@dataclass
class PlainGraph:
    """A graph compiled for a model that was never converted.

    Dynamo caches graphs per code object, so a frame resumed after a graph break in a plain
    instance's forward is reused for a converted instance of the same class. Called in a
    converted forward, the graph is rewritten then (its parameter placeholders named from
    the tensors it is called with) and runs eagerly with that module's mixers."""

    captured: fx.GraphModule
    compiled: Callable[..., Any]
    mixed: MixedGraph | None = None

    def __call__(self, *args: Any) -> Any:
        rewriter = current_rewriter()
        if rewriter is None:
            return self.compiled(*args)
        if self.mixed is None:
            self.mixed = rewriter.rewrite_eagerly(
                self.captured, "hcpass backend, plain graph", args
            )
        return self.mixed(*args)


def _log_plain_model(gm: fx.GraphModule) -> None:
    annotate_parameters(gm, names=None)
    _, analysis = analyse(gm)
    if analysis.sites:
        log.info(
            "hcpass: found %d residual site(s); this model is compiled unchanged. "
            "hcpass.convert(model, example_inputs) adds the mixers.",
            len(analysis.sites),
        )
