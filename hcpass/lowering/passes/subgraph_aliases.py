"""Inductor post-grad pass: an ``invoke_subgraph`` body returns no tensor that shares storage
with one of its inputs.

Why: after AOTAutograd partitions a shared subgraph, its forward often returns one of its own
inputs as a tensor saved for backward (the min-cut partitioner saves a primal, which costs no
memory of its own). Inductor (torch 2.13) lowers the call to an ``InvokeSubgraph`` node whose
outputs are fresh ``MultiOutput`` buffers to the calling graph: nothing tells the caller's
memory planner that such an output *is* the operand it passed in. Once the operand's last
visible use is the call, the planner frees its buffer and hands it to a later tensor of the
same size (``buf26 = buf3; del buf3  # reuse``), which overwrites the saved tensor; the
backward then reads another site's state. That is what gave hc's mixers wrong gradients with
a shared coefficient subgraph (hc's ``project`` reads the state itself, so the state is
saved; sinkhorn was right because the base class's projection then saved a flattened copy
-- it now reads the state in place too, stream by stream, and relies on this pass as well).

The fix: each such output is replaced by a copy made inside the body, so the buffer the caller
gets is one the body allocated. It costs one copy of the aliased input per call: hc's stream
state, and for every manifold the parameters (or their transposes) the body saves. Those are
graph inputs, which Inductor never reuses, but the body is shared between calls and cannot
tell which of its operands will be one, so everything aliased is copied.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.multiprocessing.reductions import StorageWeakRef

_INVOKE_SUBGRAPH = torch.ops.higher_order.invoke_subgraph
_aten = torch.ops.aten


class CopySubgraphOutputAliases(CustomGraphPass):
    """``post_grad_custom_post_pass``: runs on every graph Inductor compiles (forward and
    backward, and each nested body) and fixes the bodies of the ``invoke_subgraph`` calls
    it finds."""

    def __call__(self, graph: fx.Graph) -> None:
        owner = graph.owning_module
        if owner is None:
            return
        done: set[str] = set()
        for node in graph.find_nodes(op="call_function", target=_INVOKE_SUBGRAPH):
            body = node.args[0]
            if not isinstance(body, fx.Node) or body.op != "get_attr" or body.target in done:
                continue
            done.add(body.target)
            module = getattr(owner, body.target)
            if isinstance(module, fx.GraphModule) and copy_output_aliases(module.graph):
                module.recompile()

    def uuid(self) -> Any:
        # Part of Inductor's FX-graph cache key: a new version of this file is a new pass.
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def copy_output_aliases(graph: fx.Graph) -> int:
    """Replace each output of `graph` that shares storage with a placeholder by a copy
    (same size, strides and offset within a fresh buffer). Returns how many were copied."""
    bases: dict[StorageWeakRef, fx.Node] = {}
    for ph in graph.find_nodes(op="placeholder"):
        val = ph.meta.get("val")
        if isinstance(val, torch.Tensor):
            bases.setdefault(StorageWeakRef(val.untyped_storage()), ph)
    output = graph.output_node()
    copies: dict[fx.Node, fx.Node] = {}

    def fresh(out: Any) -> Any:
        if not isinstance(out, fx.Node):
            return out
        val = out.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return out
        base = bases.get(StorageWeakRef(val.untyped_storage()))
        if base is None:
            return out
        if out not in copies:
            with graph.inserting_before(output):
                copies[out] = _copy(graph, out, base)
        return copies[out]

    outs = output.args[0]
    output.args = (
        type(outs)(fresh(o) for o in outs) if isinstance(outs, (tuple, list)) else fresh(outs),
    )
    return len(copies)


def _copy(graph: fx.Graph, out: fx.Node, base: fx.Node) -> fx.Node:
    """A node computing `out` (which aliases the placeholder `base`) into a fresh buffer."""
    val, base_val = out.meta["val"], base.meta["val"]
    layout = (*val.shape, *val.stride(), val.storage_offset(), base_val.storage_offset())
    # The consumers were traced with `out`'s exact strides: a view of a contiguous input is
    # rebuilt as the same view of a contiguous copy. Otherwise (the input itself, a
    # non-contiguous input, symbolic sizes) clone `out`, which keeps the strides of any dense
    # tensor; a mismatch would fail Inductor's stride assertion loudly, not silently.
    if out is base or not base_val.is_contiguous() or not all(isinstance(d, int) for d in layout):
        copy = graph.call_function(_aten.clone.default, (out,))
        copy.meta["val"] = val.clone()
        return copy
    whole = graph.call_function(_aten.clone.default, (base,))
    whole.meta["val"] = base_val.clone()
    args = (tuple(val.shape), tuple(val.stride()), val.storage_offset() - base_val.storage_offset())
    copy = graph.call_function(_aten.as_strided.default, (whole, *args))
    copy.meta["val"] = _aten.as_strided.default(whole.meta["val"], *args)
    return copy
