"""Joint-graph pass: the n-stream state each site's merge writes is saved for backward, not
recomputed there.

Why: AOTAutograd's min-cut partitioner treats pointwise chains as free to recompute and
minimises the bytes it saves. A site's new state ``X' = H_res X + H_post y`` is pointwise
in the previous state, so it would save the branch outputs ``y`` and the coefficients (n times
smaller) and rebuild every site's state in backward -- all of them, in one kernel at the
start of the backward, whose buffers then live as long as saved ones would have. The rebuild
chains every site to the one before, so its kernel, and the cold compile, grow with depth
(docs/performance.md has the measurements).

Only the merges `LowerToReference` inlines need it (a shared merge's state is the output of
a subgraph call, which the partitioner never recomputes). It tags their nodes (node meta
``custom``, which AOTAutograd copies onto every node it traces from them); this pass marks
each merge's result -- the tagged node read outside its merge -- ``MUST_SAVE``, the policy
selective activation checkpointing uses. Only the result: a bf16 model's merge upcasts its
inputs to fp32, and banning those casts from recomputation would save the fp32 copies
instead. Left alone: nodes that already carry a policy (the user's activation checkpointing)
and every node when the user set ``torch._functorch.config.activation_memory_budget`` below 1
(they asked the partitioner to trade compute for memory).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from torch import fx
from torch._functorch import config as functorch_config
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import CheckpointPolicy

from hcpass.lowering.passes.graph_pass import count

# Key in node.meta["custom"]: which lowered merge (post_res) a traced node came from.
STREAM_STATE = "hcpass_stream_state"


def tag_stream_state(node: fx.Node) -> None:
    """Mark `node` (a merge, before AOTAutograd traces it) for `SaveStreamStates`."""
    node.meta["custom"] = {**node.meta.get("custom", {}), STREAM_STATE: node.name}


class SaveStreamStates(CustomGraphPass):
    """``joint_custom_post_pass``: runs on the joint forward-backward graph before it is
    partitioned."""

    def __call__(self, graph: fx.Graph) -> None:
        if functorch_config.activation_memory_budget < 1:
            return
        backward = _backward_nodes(graph)
        for node in graph.nodes:
            merge = _merge_of(node)
            if merge is None or "recompute" in node.meta:
                continue
            if any(_merge_of(u) != merge and u not in backward for u in node.users):
                _must_save(node, merge)
                count("stream_states_saved")

    def uuid(self) -> Any:
        # Part of Inductor's FX-graph cache key: a new version of this file is a new pass.
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _must_save(node: fx.Node, merge: str) -> None:
    """Mark `node` and, when it is a view, the merge's node it views: the backward reads
    the merge's tensor through its own views of the base, which would be rebuilt."""
    while True:
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        base = node.args[0] if getattr(node.target, "is_view", False) and node.args else None
        if not isinstance(base, fx.Node) or _merge_of(base) != merge or "recompute" in base.meta:
            return
        node = base


def _backward_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes that read a tangent, directly or not: a merge's intermediate read only by
    them (its own backward) is not its result."""
    backward: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "output":
            continue
        if (node.op == "placeholder" and node.name.startswith("tangents")) or any(
            n in backward for n in node.all_input_nodes
        ):
            backward.add(node)
    return backward


def _merge_of(node: fx.Node) -> str | None:
    custom = node.meta.get("custom")
    return custom.get(STREAM_STATE) if isinstance(custom, dict) else None
