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
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from .matcher import ANY, Call, OneOf, Pattern, User
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
POWS = frozenset({"pow", torch.pow, operator.pow})
SQUARES = frozenset({torch.square, "square"})
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
    squares = [u for s in sources for u in s.users if SPELLED_RMS_NORM.call.matches(u, {})]
    why = "not a LayerNorm/RMSNorm over the channels"
    for square in squares:
        found = SPELLED_RMS_NORM.match(square, where=_norm_checks(value, casts))
        if isinstance(found, Match):
            return _spelled_norm(value, casts, found.value)
        why = f"not a LayerNorm, and not an RMSNorm over the channels: {found.reason}"
    return Skip(f"{_describe(reader)}, {why}")


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


@dataclass(frozen=True)
class SpelledRmsNorm:
    """The nodes of ``c * rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)``."""

    square: fx.Node
    mean: fx.Node
    add: fx.Node
    rsqrt: fx.Node
    scale: fx.Node  # the product of the input (or its cast) and rsqrt


# The epsilon is rescaled in place, so each intermediate must have no other reader (`sole`).
SPELLED_RMS_NORM = Pattern(
    root="square",
    # square = c.pow(2), or torch.square(c)
    call=OneOf(Call(POWS, (ANY, 2)), Call(SQUARES, (ANY,))),
    steps=(
        # mean = square.mean(-1, keepdim=True): which dimension, `where` checks
        User(
            "mean",
            "square",
            Call(MEANS, ("square", ...), kwargs=...),
            missing="the square is not averaged, or read by more than the average",
            sole=True,
        ),
        # add = mean + eps
        User(
            "add",
            "mean",
            OneOf(Call(ADDS, ("mean", float)), Call(ADDS, (float, "mean"))),
            missing="the mean of squares gets no epsilon, or has another reader",
            sole=True,
        ),
        # rsqrt = rsqrt(add)
        User(
            "rsqrt",
            "add",
            Call(RSQRTS, ("add",)),
            missing="no rsqrt of the mean of squares, or another reader of its sum",
            sole=True,
        ),
        # scale = c * rsqrt (or rsqrt * c)
        User(
            "scale",
            "rsqrt",
            OneOf(Call(MULS, (ANY, "rsqrt")), Call(MULS, ("rsqrt", ANY))),
            missing="nothing is scaled by the rsqrt",
        ),
    ),
    build=SpelledRmsNorm,
)


def _norm_checks(value: fx.Node, casts: list[fx.Node]) -> Callable[[SpelledRmsNorm], Skip | None]:
    """The checks a spelled-out RMSNorm of `value` (read directly or through `casts`) must
    pass beyond its shape."""
    inputs = {value, *casts}

    def check(norm: SpelledRmsNorm) -> Skip | None:
        if not _means_last_dim(norm.mean):
            return Skip("its mean is not over the last dimension with keepdim=True")
        scaled = [
            m
            for m in norm.rsqrt.users
            if calls_one_of(m, MULS) and any(a in inputs for a in m.args)
        ]
        if norm.square.args[0] not in inputs or scaled != [norm.scale]:
            return Skip("it squares or scales another value than its input")
        # A cast read by anything else would hand that reader the rescaled value.
        nodes = {norm.square, norm.scale, *casts}
        if any(u not in nodes for cast in casts for u in cast.users):
            return Skip("the cast of its input has other readers")
        return None

    return check


def _spelled_norm(value: fx.Node, casts: list[fx.Node], norm: SpelledRmsNorm) -> ScaleInvariantNorm:
    nodes = frozenset({norm.square, norm.scale, *casts})
    eps_index = next(i for i, a in enumerate(norm.add.args) if isinstance(a, float))
    eps = Epsilon(norm.add, eps_index, norm.add.args[eps_index])
    return ScaleInvariantNorm(value, nodes, eps, nodes | {norm.mean, norm.add, norm.rsqrt})


def _reads_first(node: fx.Node, value: fx.Node) -> bool:
    return bool(node.args) and node.args[0] is value


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
