"""Lowering passes the hcpass backend runs on a rewritten graph before Inductor.

Each pass is one `GraphPass` in one module, editing the graph in place; `PassManager` runs
them in order (`hcpass.lowering.backend.lowering` picks the list for CPU or CUDA). The passes
run before ``compile_fx``, so Inductor's cache keys on the graph they produced: a change to a
pass that changes its output changes the key, with no pass-level hash to keep in step.
"""

from hcpass.lowering.passes.manager import GraphPass, PassManager

__all__ = ["GraphPass", "PassManager"]
