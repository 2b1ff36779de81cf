"""The C++ kernels of hcpass ops on CPU (``hcpass/manifolds/sinkhorn.cpp``,
``hcpass/ops/streams.cpp``), built on first use with Inductor's C++ toolchain
(`CppCodeCache`: the compiler, flags and on-disk cache it builds its own kernels with), then
loaded from that cache.

A kernel is a ``.cpp`` file of the package defining ``extern "C" void kernel(...)``, called
through ctypes (pointer arguments as ``tensor.data_ptr()``). It includes no ATen header and
is built without Inductor's vector-ISA probe, which compiles ATen's vector headers once per
cache directory (~10 s cold): a build is ~1-2 s, ``-march=native`` still picks the ISA. Where
it cannot be built (no C++ compiler, a torch without this Inductor API) `load` says why once,
in the ``hcpass`` log, and returns None: its ops then run in PyTorch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from importlib import resources

from hcpass.logs import log

_LOCK = threading.Lock()
_KERNELS: dict[str, Callable[..., None] | None] = {}
_PREFETCHING: set[str] = set()


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker) has none of the parent's threads: a build that
    was running there never finishes here, and the lock it held would stay held."""
    global _LOCK
    _LOCK = threading.Lock()
    _PREFETCHING.intersection_update(_KERNELS)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def load(name: str, argtypes: Sequence[type]) -> Callable[..., None] | None:
    """The ``kernel`` function of ``hcpass/<name>`` (``"ops/streams.cpp"``) taking `argtypes`
    (ctypes types, e.g. ``(ctypes.c_void_p, ctypes.c_int64)``), or None where it cannot be
    built."""
    with _LOCK:  # one build per process, whichever thread asks first
        if name not in _KERNELS:
            _KERNELS[name] = _build(name, argtypes)
        return _KERNELS[name]


def prefetch(name: str, argtypes: Sequence[type]) -> None:
    """Start building `name` on a background thread unless it is built or being built: the
    compiler then runs while a trace goes on (its ops' fake kernels call this), not at the
    first real call. `load` waits for it."""
    with _LOCK:
        if name in _KERNELS or name in _PREFETCHING:
            return
        _PREFETCHING.add(name)
    thread = threading.Thread(target=load, args=(name, argtypes), name=f"hcpass-build-{name}")
    thread.daemon = True
    thread.start()


def _build(name: str, argtypes: Sequence[type]) -> Callable[..., None] | None:
    source = resources.files(__package__).joinpath(*name.split("/")).read_text()
    try:
        from torch._inductor.codecache import CppCodeCache

        try:
            library = CppCodeCache.load(source, needs_vec_isa=False)
        except TypeError:  # an Inductor without the flag: it probes the ISA first, once
            library = CppCodeCache.load(source)
        kernel = library.kernel
    except Exception as error:  # noqa: BLE001 -- any failure to build means: run in PyTorch
        log.warning(
            "hcpass: could not build the C++ kernel %s (%s: %s); its ops run in PyTorch on "
            "CPU instead, correct but slower",
            name,
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
        )
        return None
    kernel.argtypes = list(argtypes)
    kernel.restype = None
    return kernel
