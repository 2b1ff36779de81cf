"""Lowering passes the hcpass backend runs on a rewritten graph before Inductor.

Each pass is one class in one module with ``__call__(graph)`` and ``uuid()``; the
`PassManager` orders them and hashes their uuids into one key, so a change to any pass
changes the key Inductor caches compiled graphs under.
"""

from hcpass.passes.manager import GraphPass, PassManager

__all__ = ["GraphPass", "PassManager"]
