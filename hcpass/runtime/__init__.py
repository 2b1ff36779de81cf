"""Stage 3, the runtime: the converted model as an ``nn.Module``.

- `module`: `ConvertedModule`, which owns the original parameters and the mixers (the
  ``nn.Module`` face; `proxy`: what it passes through to the original);
- `call`: one forward call (`Run`), and a rewritten graph as Dynamo calls it (`MixedGraph`);
  a backend asks the running call for what it needs through `call.Rewriter`;
- `graphs`: the per-graph rewrite driver; `lookup`: anchor parameter -> mixer;
  `checks`: did a call run as converted;
- `families`: the rewrite families, one `Family` record each;
- `mixer`: `Mixer`, one site's learned coefficients; `pseudo_query`: `PseudoQuery`;
- `handoff`: carries a chain's n streams across graph breaks.
"""
