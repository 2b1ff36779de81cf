"""The mixer op contract: `reference` (the math, plain PyTorch), `batched` (the stream ops'
eager CPU kernels) and `library` (the ``hcpass::`` ops)."""

from hcpass.ops import batched, library, reference
from hcpass.ops.library import REFERENCE

__all__ = ["REFERENCE", "batched", "library", "reference"]
