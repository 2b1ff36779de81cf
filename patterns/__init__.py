"""Graph patterns hcpass matches in Dynamo (torch-IR) graphs, one kind per module.

- `residual_add`: the residual-add spellings (``a + b``, ``x += f(x)``, ``torch.add(.., alpha=)``,
  ``Tensor.add``);
- `stream_op`: per-position ops a residual stream may pass through between two sites
  (post-norm, post-activation, dropout, dtype casts), which the rewrite applies to every stream.

Each pattern is a small class listed in its module's ``PATTERNS``; `hcpass.sites` consults
those lists, so adding a spelling is one class in one file.
"""

from hcpass.patterns.residual_add import AddMatch, match_residual_add
from hcpass.patterns.stream_op import is_affine_stream_op, is_cast, is_stream_op

__all__ = ["AddMatch", "is_affine_stream_op", "is_cast", "is_stream_op", "match_residual_add"]
