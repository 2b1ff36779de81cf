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
from hcpass.frontend.plan import Report, SiteReport
from hcpass.manifolds import Manifold, register_manifold
from hcpass.manifolds import available as available_manifolds
from hcpass.runtime.families import NAMES as FAMILIES
from hcpass.runtime.mixer import Mixer
from hcpass.runtime.module import ConvertedModule
from hcpass.runtime.pseudo_query import PseudoQuery
from hcpass.tools import plot
from hcpass.tools.inspection import (
    DepthProfile,
    DepthWeights,
    SiteProfile,
    depth_profile,
    depth_weights,
    gain,
    mixers,
)
from hcpass.training import param_groups

_logs.register()

try:
    from hcpass.codegen import register_cuda_kernels as _register_cuda_kernels
except ModuleNotFoundError as error:  # no triton (a dependency on Linux only)
    if error.name != "triton":
        raise
else:
    # Here, not in the backend: a converted model run eagerly on CUDA calls the ops too.
    _register_cuda_kernels()

__all__ = [
    "FAMILIES",
    "ConvertedModule",
    "DepthProfile",
    "DepthWeights",
    "Manifold",
    "Mixer",
    "PseudoQuery",
    "Report",
    "SiteProfile",
    "SiteReport",
    "available_manifolds",
    "compile",
    "convert",
    "depth_profile",
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
