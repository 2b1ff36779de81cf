"""Inductor post-grad pass: what an ``invoke_subgraph`` body returns that shares storage with
one of its inputs keeps its buffer in the calling graph.

Why: after AOTAutograd partitions a shared subgraph, its forward often returns one of its own
inputs as a tensor saved for backward (the min-cut partitioner saves a primal, which costs no
memory of its own). Inductor (torch 2.13) lowers the call to an ``InvokeSubgraph`` node whose
outputs are fresh ``MultiOutput`` buffers to the calling graph: nothing tells the caller's
memory planner that such an output *is* the operand it passed in. Once the operand's last
visible use is the call, the planner frees its buffer and hands it to a later tensor of the
same size (``buf26 = buf3; del buf3  # reuse``), which overwrites the saved tensor; the
backward then reads another site's state. Every projection that reads the state in place
(hc's, and the base class's, stream by stream) saves the state itself, so without this pass
its mixers' gradients are wrong.

The fix, in two parts. Where the body returns an input unchanged (hc's state; any state a
projection reads in place), the callers read the operand they passed instead of that output:
the operand is then itself saved, so its buffer lives as long as the backward needs it, and
nothing is copied (a copy would cost every site a state-sized write per step). Every other
output that shares storage with an input (a view of one: the parameters' transposes the body
saves, a few KB) is replaced by a copy made inside the body, so the buffer the caller gets is
one the body allocated. The body is shared between calls
and cannot tell which of its operands are graph inputs (never reused), so every such view
is copied.
"""

from __future__ import annotations

import hashlib
import operator
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.multiprocessing.reductions import StorageWeakRef

from hcpass.lowering.passes.graph_pass import count

_INVOKE_SUBGRAPH = torch.ops.higher_order.invoke_subgraph
_aten = torch.ops.aten


class CopySubgraphOutputAliases(CustomGraphPass):
    """``post_grad_custom_post_pass``: runs on every graph Inductor compiles (forward and
    backward, and each nested body) and fixes the ``invoke_subgraph`` calls it finds and
    their bodies."""

    def __call__(self, graph: fx.Graph) -> None:
        owner = graph.owning_module
        if owner is None:
            return
        calls: dict[str, list[fx.Node]] = {}
        for node in graph.find_nodes(op="call_function", target=_INVOKE_SUBGRAPH):
            body = node.args[0]
            if isinstance(body, fx.Node) and body.op == "get_attr":
                calls.setdefault(body.target, []).append(node)
        for target, nodes in calls.items():
            module = getattr(owner, target)
            if not isinstance(module, fx.GraphModule):
                continue
            passed_on = _read_returned_inputs_from_operands(nodes, module.graph)
            copied = copy_output_aliases(module.graph, keep=passed_on)
            count("subgraph_outputs_read_from_operands", len(passed_on))
            count("subgraph_output_aliases_copied", copied)
            if copied:
                module.recompile()

    def uuid(self) -> Any:
        # Part of Inductor's FX-graph cache key: a new version of this file is a new pass.
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _read_returned_inputs_from_operands(calls: list[fx.Node], body: fx.Graph) -> set[int]:
    """Where the body returns one of its inputs unchanged, the callers read that operand
    instead of the call's output: a graph that uses (or saves) the operand itself keeps its
    buffer alive, and no copy is needed. Returns the indices of the outputs so handed on.
    An output is left to `copy_output_aliases` unless every call's operand has the
    placeholder's exact layout (a consumer was traced with the placeholder's strides), and
    all of them are unless the calls' outputs are only read through ``getitem``."""
    placeholders = list(body.find_nodes(op="placeholder"))
    outputs = body.output_node().args[0]
    if not isinstance(outputs, (tuple, list)) or any(
        user.target is not operator.getitem for call in calls for user in call.users
    ):
        return set()
    returned = {
        k: placeholders.index(out)
        for k, out in enumerate(outputs)
        if isinstance(out, fx.Node) and out.op == "placeholder"
    }
    passed_on = {
        k
        for k, i in returned.items()
        if all(_same_layout(call.args[2 + i], placeholders[i]) for call in calls)
    }
    for call in calls:
        for user in list(call.users):
            if user.target is operator.getitem and user.args[1] in passed_on:
                user.replace_all_uses_with(call.args[2 + returned[user.args[1]]])
    return passed_on


def _same_layout(operand: Any, placeholder: fx.Node) -> bool:
    a = operand.meta.get("val") if isinstance(operand, fx.Node) else None
    b = placeholder.meta.get("val")
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dim() != b.dim() or a.dtype != b.dtype:
        return False
    pairs = [*zip(a.shape, b.shape, strict=True), *zip(a.stride(), b.stride(), strict=True)]
    return all(statically_known_true(x == y) for x, y in pairs)


def copy_output_aliases(graph: fx.Graph, keep: set[int] = frozenset()) -> int:
    """Replace each output of `graph` that shares storage with a placeholder by a copy
    (same size, strides and offset within a fresh buffer), except the outputs numbered in
    `keep`. Returns how many were copied."""
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
        type(outs)(o if k in keep else fresh(o) for k, o in enumerate(outs))
        if isinstance(outs, (tuple, list))
        else fresh(outs),
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
