"""Stage 2, the rewrite: from a graph and its chains to the n-stream graph.

- `chains`: replaces every planned site by ``hcpass::`` mixer ops over n streams
  (`rewrite_chains` -> `RewriteResult`);
- `regions`: closes the activation-checkpoint regions the front end opened.

The rewritten graph is plain FX with ``torch.ops.hcpass`` calls; the runtime
(``hcpass.runtime``) runs it, the lowering (``hcpass.lowering``) compiles it.
"""
