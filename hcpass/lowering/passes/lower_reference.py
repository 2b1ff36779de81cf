"""CPU lowering: replace the ``hcpass::`` ops by their plain-PyTorch references.

Inductor then traces the references with the rest of the graph, differentiates them with
AOTAutograd and fuses them into its C++ kernels, instead of calling the ops as opaque
extern kernels with a recomputing backward.

Every site's ``coeffs`` is inlined, so a converted model's cold compile grows with its depth
faster than the plain model's (docs/performance.md). Sharing one compiled subgraph between
sites (PyTorch's ``invoke_subgraph``) halved the compile time but gave wrong gradients for
the `hc` manifold's mixers, so it is not used.
"""

from __future__ import annotations

import operator

from torch import fx

from hcpass.lowering.passes.manager import GraphPass
from hcpass.ops import REFERENCE


class LowerToReference(GraphPass):
    def __call__(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function" and node.target in REFERENCE:
                node.target = REFERENCE[node.target]
            elif node.op == "get_attr" and graph.owning_module is not None:
                # activation-checkpoint bodies hold mixer ops too (hcpass.rewrite.regions)
                body = operator.attrgetter(node.target)(graph.owning_module)
                if isinstance(body, fx.GraphModule):
                    self(body.graph)
                    body.recompile()
