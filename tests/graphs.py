"""How the graph tests read a rewritten graph: its code, and its ops by name."""

from __future__ import annotations

import operator

import torch

import hcpass  # noqa: F401  (defines the hcpass ops)

NAMES = {
    torch.ops.hcpass.coeffs.default: "coeffs",
    torch.ops.hcpass.pre.default: "pre",
    torch.ops.hcpass.post_res.default: "post_res",
    torch.ops.hcpass.post_res_coeffs_pre.default: "post_res_coeffs_pre",
    operator.add: "add",
}


def body(gm: torch.fx.GraphModule) -> str:
    """The graph's code below the signature, without the parameter unpacking lines, with
    the manifold spec (a long string) shortened to SPEC."""
    code = gm.code.split("):\n", 1)[1]
    for node in gm.graph.nodes:
        if NAMES.get(node.target) in ("coeffs", "post_res_coeffs_pre"):
            code = code.replace(repr(node.args[-1]), "SPEC")
    lines = [line.split(";")[0].strip() for line in code.strip().splitlines()]
    return "\n".join(line for line in lines if " = L_" not in line)


def op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """The hcpass ops, additions and method calls in the graph, counted by name."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        name = NAMES.get(node.target) or (node.target if node.op == "call_method" else None)
        if name:
            counts[name] = counts.get(name, 0) + 1
    return counts
