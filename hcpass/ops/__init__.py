"""The op contract: `reference` (the math, plain PyTorch), `batched` (the stream ops'
eager CPU kernels) and `library` (the ``hcpass::`` mixer ops); `attnres` (Attention
Residuals: its reference and ops)."""

from hcpass.ops import attnres, batched, library, reference

# op -> its plain-PyTorch reference, every hcpass op (the CPU lowering inlines them)
REFERENCE = {**library.REFERENCE, **attnres.REFERENCE}

__all__ = ["REFERENCE", "attnres", "batched", "library", "reference"]
