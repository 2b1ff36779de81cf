"""hcpass: hyper-connections as a compiler pass.

report = hcpass.explain(model, example_inputs)
model2 = hcpass.convert(model, example_inputs, streams=4, manifold="sinkhorn")
model3 = hcpass.convert(model, example_inputs, family="attnres", block_size=4)
compiled = torch.compile(model2, backend="hcpass")
"""

from hcpass import logs as _logs
from hcpass import manifolds, training
from hcpass import ops as _ops  # noqa: F401  (registers torch.ops.hcpass)
from hcpass.api import compile, convert, explain
from hcpass.frontend.plan import FAMILIES, Report, SiteReport
from hcpass.manifolds import Manifold, register_manifold
from hcpass.manifolds import available as available_manifolds
from hcpass.runtime.mixer import Mixer
from hcpass.runtime.module import ConvertedModule
from hcpass.runtime.pseudo_query import PseudoQuery
from hcpass.tools import plot
from hcpass.tools.inspection import DepthWeights, depth_weights, gain, mixers
from hcpass.training import param_groups

_logs.register()

__all__ = [
    "FAMILIES",
    "ConvertedModule",
    "DepthWeights",
    "Manifold",
    "Mixer",
    "PseudoQuery",
    "Report",
    "SiteReport",
    "available_manifolds",
    "compile",
    "convert",
    "depth_weights",
    "explain",
    "gain",
    "manifolds",
    "mixers",
    "param_groups",
    "plot",
    "register_manifold",
    "training",
]
