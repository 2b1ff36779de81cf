"""Look inside a converted model: the coefficients its mixers use, the composite gain
of H_res over depth (mHC's "Amax Gain Magnitude"), and, for Attention Residuals, the
attention weights over depth."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from hcpass.frontend.capture import side_effect_free
from hcpass.ops.attnres import reference as attnres_reference
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


# ------------------------------------------------------------------ Attention Residuals
@dataclass(frozen=True)
class DepthWeights:
    """What one site (or a chain's output) read: ``weights [*pos, k]``, its softmax over the
    chain's k values (summing to 1 over the last dim), and the k `sources` those values are
    (``"input"``, then a site key per site in full Attention Residuals, ``"block j"`` in
    Block AttnRes, where the last is the current, partial block). `chain` is the key of the
    chain's first site (a model may have several chains)."""

    weights: Tensor
    sources: tuple[str, ...]
    chain: str


class _WeightRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, Tensor]] = []  # (the query's data pointer, weights)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.hcpass.attnres.default:
            values, query, eps = args
            alpha = attnres_reference.weights(values, query, eps).movedim(0, -1)
            self.calls.append((query.data_ptr(), alpha.detach()))
        return out


def depth_weights(
    model: ConvertedModule,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
) -> dict[str, DepthWeights]:
    """Per site of a model converted with ``family="attnres"``, in forward order: the
    attention weights over depth its branch used in one forward pass on the example inputs
    (`DepthWeights`), and after a chain's last site its output's (the final norm's input),
    keyed ``"<last site>:output"``.

    A chain's first site reads the chain's input alone: its weights are ones ``[*pos, 1]``.
    At init (zero queries) every site reads the mean of its k values: weights ``1 / k``. A
    site that runs twice (a weight-shared block) appears as ``name``, ``name#2``."""
    if not isinstance(model, ConvertedModule) or model.attnres is None:
        raise TypeError(
            "hcpass.depth_weights needs a model returned by hcpass.convert(..., family='attnres')"
        )
    chains = _chains(model)
    # Each op call names its site by the query it reads (the output query: the chain's end).
    read_by: dict[int, tuple[str, bool]] = {}
    for key, module in model.mixers.items():
        if module.query is not None:
            read_by[module.query.data_ptr()] = (key, False)
        if module.output_query is not None:
            read_by[module.output_query.data_ptr()] = (key, True)
    recorder = _WeightRecorder()
    with side_effect_free(model):
        model.observed_forward(recorder, *tuple(example_inputs), **(example_kwargs or {}))
    block_size = model.attnres.block_size
    result: dict[str, DepthWeights] = {}

    def add(name: str, weights: Tensor, chain: list[str]) -> None:
        sources = _sources(chain, weights.shape[-1], block_size)
        result[unique_name(name, result, separator="#")] = DepthWeights(weights, sources, chain[0])

    for pointer, weights in recorder.calls:
        key, output = read_by[pointer]
        chain = chains[key]
        # The op's first read of a chain comes right after the chain's first site, which ran
        # no op: that site read x_0 alone, with weight 1.
        if (output and len(chain) == 1) or (not output and chain.index(key) == 1):
            add(chain[0], weights.new_ones(*weights.shape[:-1], 1), chain)
        add(f"{key}:output" if output else key, weights, chain)
    return result


def _chains(model: ConvertedModule) -> dict[str, list[str]]:
    """Each site's chain, as the keys of its sites in order (from the plan's `follows`)."""
    after = {model.follows(key): key for key in model.mixers if model.follows(key) is not None}
    chains: dict[str, list[str]] = {}
    for key in model.mixers:
        if model.follows(key) is None:
            chain = [key]
            # (stops at a repeat: a cycle would mean a key that runs twice in one chain)
            while chain[-1] in after and after[chain[-1]] not in chain:
                chain.append(after[chain[-1]])
            for member in chain:
                chains[member] = chain
    return chains


def _sources(chain: list[str], k: int, block_size: int | None) -> tuple[str, ...]:
    """Labels of a chain's first k values: source 0 is the chain's input, source j the j-th
    block (full Attention Residuals: the j-th site's output, named by the site's key)."""
    if (block_size or 1) == 1:
        return ("input", *chain[: k - 1])
    return ("input", *(f"block {j}" for j in range(1, k)))
