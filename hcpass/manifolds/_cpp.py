"""C++ kernels of the manifold ops on CPU, built on first use with Inductor's CPU toolchain:
the compiler, flags and on-disk cache it builds its own kernels with (a few seconds once,
then a load from the cache). Not a manifold: nothing here is registered.

A kernel is a ``.cpp`` file in this package defining ``void kernel(...)``; `load` wraps it in
Inductor's Python bindings, which take tensors for pointer arguments (their data pointers)
and Python ints for ``int64_t``. Where it cannot be built (no C++ compiler, a torch whose
Inductor lacks these bindings) `load` says why once, in the ``hcpass`` log, and returns None:
the op then runs its PyTorch reference.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from importlib import resources

from hcpass.logs import log

_LOCK = threading.Lock()
_KERNELS: dict[str, Callable[..., None] | None] = {}
_PREFETCHING: set[str] = set()


def load(name: str, argtypes: Sequence[str]) -> Callable[..., None] | None:
    """The ``kernel`` function of ``hcpass/manifolds/<name>``, or None where it cannot be
    built. `argtypes` are its C++ parameter types, e.g. ``("const void*", "int64_t")``."""
    with _LOCK:  # one build per process, whichever thread asks first
        if name not in _KERNELS:
            _KERNELS[name] = _build(name, argtypes)
        return _KERNELS[name]


def prefetch(name: str, argtypes: Sequence[str]) -> None:
    """Start building `name` on a background thread unless it is built or being built: the
    compiler then runs while a trace goes on (its ops' fake kernels call this), not at the
    first real call. `load` waits for it."""
    with _LOCK:
        if name in _KERNELS or name in _PREFETCHING:
            return
        _PREFETCHING.add(name)
    threading.Thread(
        target=load, args=(name, argtypes), name=f"hcpass-build-{name}", daemon=True
    ).start()


def _build(name: str, argtypes: Sequence[str]) -> Callable[..., None] | None:
    source = resources.files(__package__).joinpath(name).read_text()
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        return CppPythonBindingsCodeCache.load_pybinding(list(argtypes), source)
    except Exception as error:  # noqa: BLE001 -- any failure to build means: use the reference
        log.warning(
            "hcpass: could not build the C++ kernel %s (%s: %s); its op runs the PyTorch "
            "reference on CPU instead, correct but slower",
            name,
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
        )
        return None
