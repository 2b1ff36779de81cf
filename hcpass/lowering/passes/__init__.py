"""Every pass the hcpass backend runs on a converted model's graphs: one plan per device,
each pass listed where it runs, in order (as Inductor's ``post_grad_passes`` lists its own).

============  ======================================  ======================  ======================
where         what it sees                            CPU                     CUDA
============  ======================================  ======================  ======================
pre-Inductor  the rewritten graph, before compile_fx  `LowerToReference`      `BatchBlockAttention`,
                                                                              `FuseAcrossSites`
joint         AOTAutograd's forward-backward graph,   `SaveStreamStates`
              before partitioning
post-grad     each graph Inductor compiles (forward,  `CopySubgraphOutputAliases`
              backward, nested bodies)                (with shared subgraphs)
============  ======================================  ======================  ======================

On CUDA, `BatchBlockAttention` computes Block Attention Residuals' phase 1 once per block for
all its sites' queries (``attnres_blocks``; each site keeps its ``attnres_merge``), and
`FuseAcrossSites` fuses the boundaries between Hyper-Connections sites; a graph has sites of
one family, so at most one of them changes it.

The pre-Inductor passes (`GraphPass`) edit the graph in place before ``compile_fx``, so
Inductor's cache keys on the graph they produced; the joint and post-grad passes are
Inductor's custom-pass hooks (``CustomGraphPass``), in its cache key through their ``uuid``.
A never-converted model gets no pass (`NO_PASSES`). Each pass counts what it did in
``torch._dynamo.utils.counters["hcpass"]``: tests and users read counts, not log lines.

Graphs that reach no backend -- a converted model run eagerly -- get one rewrite, which is
the runtime's, not a lowering pass: `hcpass.runtime.decode.call_decode_steps` puts each
site's ops behind the native decoding path. Compiled and exported graphs never get it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from hcpass.lowering.passes.batch_block_attention import BatchBlockAttention
from hcpass.lowering.passes.fuse_across_sites import FuseAcrossSites
from hcpass.lowering.passes.graph_pass import GraphPass
from hcpass.lowering.passes.lower_reference import LowerToReference
from hcpass.lowering.passes.save_stream_states import SaveStreamStates
from hcpass.lowering.passes.subgraph_aliases import CopySubgraphOutputAliases


@dataclass(frozen=True)
class PassPlan:
    """The passes for one device, by where they run."""

    pre_inductor: tuple[GraphPass, ...] = ()
    joint: tuple[CustomGraphPass, ...] = ()
    post_grad: tuple[CustomGraphPass, ...] = ()

    def lower(self, graph: fx.Graph) -> None:
        """Run the pre-Inductor passes on `graph`, in place, then check it is well formed."""
        for graph_pass in self.pre_inductor:
            graph_pass(graph)
        graph.lint()

    def inductor_config(self) -> dict[str, Any]:
        """``compile_fx``'s ``config_patches`` that add the joint and post-grad passes after
        any the user set."""
        from torch._inductor import config
        from torch._inductor.custom_graph_pass import get_custom_graph_passes

        patches: dict[str, Any] = {}
        for hook, passes in (
            ("joint_custom_post_pass", self.joint),
            ("post_grad_custom_post_pass", self.post_grad),
        ):
            if passes:
                patches[hook] = [*get_custom_graph_passes(getattr(config, hook)), *passes]
        return patches


NO_PASSES = PassPlan()


def pass_plan(cuda: bool, share: bool = True) -> PassPlan:
    """The passes for a converted model's graph on CUDA or CPU. `share` (CPU): every site's
    mixer work in shared subgraphs (`LowerToReference`); False inlines it, the backend's
    fallback where Inductor cannot compile the shared form."""
    if cuda:
        # The ops stay hcpass ops, whose CUDA kernels (the generated Triton kernels) `import
        # hcpass` registered; a Block AttnRes block's depth attentions share phase 1, and the
        # boundaries between Hyper-Connections sites are fused.
        return PassPlan(pre_inductor=(BatchBlockAttention(), FuseAcrossSites()))
    return PassPlan(
        pre_inductor=(LowerToReference(share),),
        # Every inlined merge's new state is saved for backward instead of rebuilt there.
        joint=(SaveStreamStates(),),
        # Without it Inductor can recycle the buffer of a tensor a shared subgraph saved.
        post_grad=(CopySubgraphOutputAliases(),) if share else (),
    )


__all__ = ["NO_PASSES", "GraphPass", "PassPlan", "pass_plan"]
