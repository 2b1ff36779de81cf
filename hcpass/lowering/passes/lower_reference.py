"""CPU lowering: inline the stream ops' plain-PyTorch references; keep ``coeffs`` an op.

``pre`` and ``post_res`` read and write the n-stream state, the model's largest tensors:
inlined, Inductor differentiates them with AOTAutograd and fuses them into the C++ kernels
of their neighbours (the branch's first op, the next site's mix), so the state is not read
back an extra time.

``coeffs`` stays an opaque op (an extern kernel call in Inductor's code, its backward the
``coeffs_backward`` op, both running the reference's closed forms eagerly). Its work is per
position on n x n matrices, but inlined it is long: Sinkhorn's iterations unroll, and one
site's coefficients traced and differentiated are ~685 FX nodes (n = 4, 20 iterations).
Inlined at every site, that graph is traced, partitioned, lowered and scheduled again per
site, which made a converted model's cold compile grow ~8x faster per layer than the plain
model's (docs/performance.md). As an op it costs two nodes per site.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from hcpass.lowering.passes.manager import GraphPass
from hcpass.ops import REFERENCE

INLINED = frozenset({torch.ops.hcpass.pre.default, torch.ops.hcpass.post_res.default})


class LowerToReference(GraphPass):
    def __call__(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function" and node.target in INLINED:
                node.target = REFERENCE[node.target]
            elif node.op == "get_attr" and graph.owning_module is not None:
                # activation-checkpoint bodies hold mixer ops too (hcpass.rewrite.regions)
                body = operator.attrgetter(node.target)(graph.owning_module)
                if isinstance(body, fx.GraphModule):
                    self(body.graph)
                    body.recompile()
