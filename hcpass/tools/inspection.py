"""Look inside a converted model: the coefficients its mixers use, and the composite gain
of H_res over depth (mHC's "Amax Gain Magnitude")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from hcpass.frontend.capture import side_effect_free
from hcpass.runtime.module import ConvertedModule
from hcpass.text import unique_name


def _stream_cosine(x: Tensor) -> Tensor:
    """Mean cosine similarity over the pairs of streams of ``x [n, *pos, C]``, per position
    (1 for n = 1: one stream is its own copy)."""
    n = x.shape[0]
    if n == 1:
        return x.new_ones(x.shape[1:-1], dtype=torch.float32)
    unit = torch.nn.functional.normalize(x.detach().float(), dim=-1)
    gram = torch.einsum("i...c,j...c->...ij", unit, unit)
    return (gram.sum((-2, -1)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))


class _CoefficientRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, Tensor]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.hcpass.coeffs.default:
            x, bias = args[0], args[3]
            record = dict(
                zip(("h_pre", "h_post", "h_res"), (t.detach().clone() for t in out), strict=True)
            )
            record["stream_cosine"] = _stream_cosine(x)
            self.calls.append((bias.data_ptr(), record))
        return out


def mixers(
    model: ConvertedModule,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Per site, in forward order: the ``h_pre [*pos, n]``, ``h_post [*pos, n]`` and
    ``h_res [*pos, n, n]`` used in one forward pass on the example inputs, and
    ``stream_cosine [*pos]``, the mean cosine similarity between pairs of the site's input
    streams (1 at init, where they are copies; how far below 1 says how much the streams
    have diverged). A site that runs twice (a weight-shared block) appears as ``name``,
    ``name#2``."""
    if not isinstance(model, ConvertedModule):
        raise TypeError("hcpass.mixers needs a model returned by hcpass.convert")
    key_of = {mixer.bias.data_ptr(): key for key, mixer in model.mixers.items()}
    recorder = _CoefficientRecorder()
    with side_effect_free(model):
        model.observed_forward(recorder, *tuple(example_inputs), **(example_kwargs or {}))
    result: dict[str, dict[str, Tensor]] = {}
    for pointer, record in recorder.calls:
        result[unique_name(key_of[pointer], result, separator="#")] = record
    return result


def gain(
    model: ConvertedModule,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, float]]:
    """Amax gain of the composite ``P = H_res[d] @ ... @ H_res[1]`` after each depth d.

    forward gain = max_i sum_j |P_ij| (max absolute row sum), backward gain = max_j
    sum_i |P_ij| (max absolute column sum), each averaged over positions. The product
    restarts where the positions change (a new chain: after a projection shortcut)."""
    rows = []
    product: Tensor | None = None
    for depth, coefficients in enumerate(mixers(model, example_inputs, example_kwargs).values(), 1):
        h_res = coefficients["h_res"].double()
        if product is None or product.shape != h_res.shape:
            product = torch.eye(h_res.shape[-1], dtype=h_res.dtype).expand_as(h_res)
        product = h_res @ product
        rows.append(
            {
                "depth": depth,
                "forward": product.abs().sum(-1).amax(-1).mean().item(),
                "backward": product.abs().sum(-2).amax(-1).mean().item(),
            }
        )
    return rows
