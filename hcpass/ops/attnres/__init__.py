"""Attention Residuals (arXiv 2603.15031): `reference` (the math, plain PyTorch, and the
two phases the kernels split it in) and `library` (the ``hcpass::attnres`` ops)."""

from hcpass.ops.attnres import library, reference
from hcpass.ops.attnres.library import REFERENCE

__all__ = ["REFERENCE", "library", "reference"]
