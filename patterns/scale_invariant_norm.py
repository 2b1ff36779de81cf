"""Normalisations over the channels that give the same output for any positive multiple of
their input: LayerNorm and RMSNorm, called or spelled out.

Attention Residuals replace a pre-norm block's input ``x`` by a convex combination of
earlier values, which at init (uniform weights) is ``x / k``: a branch that starts with one
of these norms computes what it did, provided the norm's epsilon is divided by ``k^2``
(``LN(x/k; eps/k^2) = LN(x; eps)``). The match captures where the epsilon is written so
the rewrite can rescale it.

The spelled-out RMSNorm (HF Llama, T5, most hand-written models)::

    c = x.to(torch.float32)            # optional cast
    r = torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    out = c * r                        # or x * r
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from .node_sets import calls_one_of, is_cast, target_name
from .result import Match, Skip

# name -> (position of eps in the call's arguments, its default when left out; None: the
# input dtype's machine epsilon, as F.rms_norm does)
CALLED_NORMS: dict[object, tuple[int, float | None]] = {
    F.layer_norm: (4, 1e-5),
    torch.layer_norm: (4, 1e-5),
    F.rms_norm: (3, None),
    torch.rms_norm: (3, None),
}
SQUARES = frozenset({"pow", torch.pow, operator.pow, torch.square, "square"})
MEANS = frozenset({"mean", torch.mean})
RSQRTS = frozenset({"rsqrt", torch.rsqrt})
ADDS = frozenset({operator.add, "add", torch.add})
MULS = frozenset({operator.mul, "mul", torch.mul})


@dataclass(frozen=True)
class Epsilon:
    """Where a norm's epsilon is written: argument `index` (int) or keyword `index` (str) of
    `node`, currently `value`."""

    node: fx.Node
    index: int | str
    value: float


@dataclass(frozen=True)
class ScaleInvariantNorm:
    input: fx.Node  # the value normalised
    nodes: frozenset[fx.Node]  # the norm's nodes that read `input` (directly or via a cast)
    eps: Epsilon
    body: frozenset[fx.Node]  # all of the norm's nodes, from its input to its output


def norms_reading(
    value: fx.Node, readers: Iterable[fx.Node]
) -> Match[list[ScaleInvariantNorm]] | Skip:
    """The scale-invariant norms that `readers` (users of `value`) belong to, or why one of
    them is not such a norm. Every reader must be part of a norm of `value` over its last
    dimension."""
    readers = set(readers)
    norms: list[ScaleInvariantNorm] = []
    while readers:
        reader = min(readers)  # the first in graph order
        found = _norm_at(value, reader)
        if isinstance(found, Skip):
            return found
        norms.append(found)
        readers -= found.nodes
    return Match(norms)


def _norm_at(value: fx.Node, reader: fx.Node) -> ScaleInvariantNorm | Skip:
    called = _called_norm(value, reader)
    if called is not None:
        return called
    casts = [reader] if is_cast(reader) and _reads_first(reader, value) else []
    sources = [value, *casts]
    squares = [u for s in sources for u in s.users if calls_one_of(u, SQUARES)]
    for square in squares:
        spelled = _spelled_rms_norm(value, square, casts)
        if spelled is not None:
            return spelled
    return Skip(f"{_describe(reader)}, not a LayerNorm/RMSNorm over the channels")


def _called_norm(value: fx.Node, reader: fx.Node) -> ScaleInvariantNorm | None:
    target = reader.target if reader.op == "call_function" else None
    if target not in CALLED_NORMS or not _reads_first(reader, value):
        return None
    shape = reader.args[1] if len(reader.args) > 1 else reader.kwargs.get("normalized_shape")
    channels = value.meta["example_value"].shape[-1]
    if not isinstance(shape, (tuple, list)) or list(shape) != [channels]:
        return None  # over more than the channels: scale-invariant too, but not per position
    position, default = CALLED_NORMS[target]
    if len(reader.args) > position:
        eps = Epsilon(reader, position, reader.args[position])
    else:
        eps = Epsilon(reader, "eps", reader.kwargs.get("eps", default))
    if eps.value is None:
        eps = Epsilon(eps.node, eps.index, torch.finfo(value.meta["example_value"].dtype).eps)
    return ScaleInvariantNorm(value, frozenset({reader}), eps, frozenset({reader}))


def _spelled_rms_norm(
    value: fx.Node, square: fx.Node, casts: list[fx.Node]
) -> ScaleInvariantNorm | None:
    source = square.args[0]
    if calls_one_of(square, frozenset({"pow", torch.pow, operator.pow})):
        if len(square.args) != 2 or square.args[1] != 2:
            return None
    mean = _only_user(square, MEANS)
    if mean is None or not _means_last_dim(mean):
        return None
    add = _only_user(mean, ADDS)
    if add is None:
        return None
    eps_index = next((i for i, a in enumerate(add.args) if isinstance(a, float)), None)
    if eps_index is None:
        return None
    rsqrt = _only_user(add, RSQRTS)
    if rsqrt is None:
        return None
    muls = [u for u in rsqrt.users if calls_one_of(u, MULS)]
    inputs = {value, *casts}
    scaled = [m for m in muls if any(a in inputs for a in m.args)]
    if len(scaled) != 1 or source not in inputs:
        return None
    nodes = frozenset({square, scaled[0], *casts})
    # A cast read by anything else would hand that reader the rescaled value.
    if any(u not in nodes for cast in casts for u in cast.users):
        return None
    eps = Epsilon(add, eps_index, add.args[eps_index])
    return ScaleInvariantNorm(value, nodes, eps, nodes | {mean, add, rsqrt})


def _reads_first(node: fx.Node, value: fx.Node) -> bool:
    return bool(node.args) and node.args[0] is value


def _only_user(node: fx.Node, targets: frozenset[object]) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and calls_one_of(users[0], targets) else None


def _means_last_dim(mean: fx.Node) -> bool:
    dim = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    rank = mean.args[0].meta["example_value"].dim()
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return keepdim is True and len(dims) == 1 and dims[0] in (-1, rank - 1)


def _describe(node: fx.Node) -> str:
    if node.op == "output":
        return "the graph's return (a graph break, or a returned hidden state)"
    return f"{target_name(node)} ({node.name})"
