"""What a converted model passes through to the original, at the class level.

`hcpass.runtime.module.ConvertedModule` looks the attributes it lacks up on the original
model (its ``__getattr__``); its classes do the same (`FromOriginal`), and are made per
original class (`converted_class`) so that HF generation sees the original's signature.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


class FromOriginal(type):
    """Class-level lookups a converted class lacks fall through to the original model's
    class (HF ``generate`` looks its decoding loop up as ``getattr(type(self), "_sample")``)."""

    def __getattr__(cls, name: str) -> Any:
        # Through the MRO: wrappers such as FSDP2's fully_shard subclass the converted class.
        original = next(
            (k.__dict__["_original_class"] for k in cls.__mro__ if "_original_class" in k.__dict__),
            None,
        )
        if original is None or name.startswith("__"):
            raise AttributeError(f"type object {cls.__name__!r} has no attribute {name!r}")
        return getattr(original, name)


@functools.cache
def converted_class(base: type[nn.Module], original: type[nn.Module]) -> type[nn.Module]:
    """The subclass of `base` (`ConvertedModule`) made for `original`: its ``forward`` has the
    original's signature, and class-level lookups fall through to `original`."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return base.forward(self, *args, **kwargs)

    # HF generation inspects forward's parameters to choose the inputs it passes.
    forward.__signature__ = inspect.signature(original.forward)
    namespace = {"_original_class": original, "forward": forward, "__module__": base.__module__}
    return FromOriginal(f"Converted{original.__name__}", (base,), namespace)


def encoder_decoder_generate(model_name: str, *args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError(
        f"hcpass: generate() on a converted encoder-decoder model ({model_name}) is not "
        "supported: HF's generate runs the encoder on its own (`get_encoder()`), outside the "
        "converted forward, so the encoder's sites would run without their mixers. Call the "
        "converted model itself for each step (`converted(input_ids=..., "
        "decoder_input_ids=...)`), or generate without mixers: `converted.original.generate`"
    )
