"""The mixer op contract (see `reference` for the math and `library` for the ``hcpass::`` ops)."""

from hcpass.ops import library, reference
from hcpass.ops.library import REFERENCE

__all__ = ["REFERENCE", "library", "reference"]
