"""The op contract: `reference` (the math, plain PyTorch), `streams` (the stream ops' eager
CPU kernels: C++, with `batched` as their PyTorch fallback) and `library` (the ``hcpass::``
mixer ops); `attnres` (Attention Residuals: its reference and ops)."""

from hcpass.ops import attnres, batched, library, reference, streams

# op -> its plain-PyTorch reference, every hcpass op (the CPU lowering inlines them)
REFERENCE = {**library.REFERENCE, **attnres.REFERENCE}

__all__ = ["REFERENCE", "attnres", "batched", "library", "reference", "streams"]
