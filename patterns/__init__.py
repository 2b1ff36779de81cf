"""Every graph pattern hcpass matches, as data, with the small matchers that read it.

- `node_sets`: single-node patterns -- named sets of ops (normalizations, activations,
  dropouts, casts, views, convolutions) and predicates over them; which ops a residual stream
  may pass through between sites (`is_stream_op`), which may alias their input (`is_view`);
- `residual_add`: the spellings of a tensor + tensor add (``a + b``, ``x += y``,
  ``torch.add(.., alpha=)``, ``Tensor.add``) and `match_residual_add`;
- `scale_invariant_norm`: LayerNorm and RMSNorm, called or spelled out (a multi-node
  pattern), with where their epsilon is written, for Attention Residuals;
- `site_boundary`: the multi-node pattern post_res -> coeffs -> pre between two sites of a
  rewritten graph, which the CUDA lowering fuses into one op;
- `matcher`: the matcher multi-node patterns are declared for;
- `result`: ``Match[T] | Skip``, a match or a skip with its reason.

The front end, the Attention Residuals rewrite and the CUDA lowering consult these; adding
a spelling is one line in one set. Nothing here imports the stages that use it.
"""
