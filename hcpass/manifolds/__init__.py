"""Mixer manifolds as plug-ins.

Each built-in manifold lives in its own module in this package and registers itself with
`@register_manifold`; modules here are discovered automatically, and users register their
own classes the same way from their code (see docs/extending.md).
"""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
from typing import Any

from hcpass.manifolds.base import Manifold

_REGISTRY: dict[str, type[Manifold]] = {}
_ALIASES: dict[str, str] = {}


def register_manifold(cls: type[Manifold]) -> type[Manifold]:
    """Class decorator: make `cls` selectable as ``manifold=cls.name`` (and its aliases)."""
    if not (isinstance(cls, type) and issubclass(cls, Manifold)):
        raise TypeError(f"register_manifold expects a Manifold subclass, got {cls!r}")
    for key in (cls.name, *cls.aliases):
        owner = _ALIASES.get(key)
        if owner is not None and _REGISTRY[owner] is not cls and owner != cls.name:
            raise ValueError(f"manifold name {key!r} is already taken by {owner!r}")
    _REGISTRY[cls.name] = cls
    for key in (cls.name, *cls.aliases):
        _ALIASES[key] = cls.name
    resolve.cache_clear()
    return cls


def manifold_names() -> list[str]:
    return sorted(_REGISTRY)


def available() -> dict[str, str]:
    """Registered manifold names (aliases in brackets) with a one-line description."""
    out = {}
    for name in manifold_names():
        cls = _REGISTRY[name]
        label = name + (f" ({', '.join(cls.aliases)})" if cls.aliases else "")
        out[label] = cls.description
    return out


def manifold_class(name: str) -> type[Manifold]:
    if not isinstance(name, str) or name not in _ALIASES:
        valid = ", ".join(sorted(_ALIASES))
        raise ValueError(f"unknown manifold {name!r}; valid names: {valid}")
    return _REGISTRY[_ALIASES[name]]


def create(name: str, streams: int, **options: Any) -> Manifold:
    """Instantiate a manifold by name or alias, validating every option."""
    return manifold_class(name)(streams, **options)


@functools.cache
def resolve(spec: str) -> Manifold:
    """The manifold named by `Manifold.spec()` (used inside the mixer ops)."""
    name, _, config = spec.partition(":")
    options = json.loads(config) if config else {}
    streams = options.pop("streams")
    return create(name, streams, **options)


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_discover()


__all__ = [
    "Manifold",
    "available",
    "create",
    "manifold_class",
    "manifold_names",
    "register_manifold",
    "resolve",
]
