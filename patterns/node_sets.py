"""Single-node patterns: named sets of the ops a decision about one node depends on.

A set holds ``call_function`` targets (``F.relu``, ``torch.ops.aten.add.Tensor``) and
``call_method`` names (strings: ``"relu"`` for ``x.relu()``); `calls_one_of` checks the node
kind that fits. Adding a spelling is adding it to one set here.

Stream ops. A residual stream may pass through per-position ops between two sites: post-norm
blocks (``ln(x + f(x))``), post-activation blocks (``relu(out + x)``), dropout, dtype casts.
The rewrite applies such an op to all n streams at once by folding the stream dimension into
the batch dimension, so an op qualifies only if it keeps the stream's shape and never mixes
batch elements. (Its other tensor arguments must be constants or parameters;
`hcpass.frontend.sites` checks that.)
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

# batch_norm is absent on purpose: in training it computes statistics across the batch,
# which with streams folded into the batch would mix streams.
NORMALIZATIONS = frozenset({F.layer_norm, F.rms_norm, F.group_norm, torch.layer_norm})

ACTIVATIONS = frozenset(
    {
        F.relu,
        torch.relu,
        F.gelu,
        F.silu,
        F.elu,
        F.leaky_relu,
        F.mish,
        F.hardswish,
        F.relu6,
        F.selu,
        F.celu,
        F.softplus,
        torch.tanh,
        torch.sigmoid,
        F.tanh,
        F.sigmoid,
        "relu",
        "relu_",
        "tanh",
        "sigmoid",
    }
)

# Dropout on the stream between sites multiplies it by a mask: lifted, one mask scales all
# n streams (`hcpass.rewrite.chains`), so their mean is dropped as the original stream is.
# Alpha dropout is not a mask product (dropped values become a constant): not lifted, the
# chain ends there.
DROPOUTS = frozenset({F.dropout, torch.dropout})

# Dtype conversions. Besides sitting between sites, a cast may stand between a chain's input
# and its first add: Mamba's ``residual = x.to(torch.float32)`` keeps the residual in fp32
# while the branch reads ``x`` (`hcpass.frontend.sites` looks through casts there).
CASTS = frozenset({"to", "type", "type_as", "float", "double", "half", "bfloat16"})

# Changes the memory layout only, not a value.
LAYOUT_CHANGES = frozenset({"contiguous"})

STREAM_OPS = NORMALIZATIONS | ACTIVATIONS | DROPOUTS | CASTS | LAYOUT_CHANGES

# Ops whose output may alias their input: an in-place add on such a value would mutate
# another tensor as well, so its site is skipped. Besides views, this holds ops that return
# their input itself when there is nothing to do (``contiguous``, ``to``): ``to`` is in
# CASTS too, because the two sets answer different questions.
VIEWS = frozenset(
    {
        "view",
        "reshape",
        "transpose",
        "permute",
        "t",
        "expand",
        "narrow",
        "select",
        "unsqueeze",
        "squeeze",
        "flatten",
        "unflatten",
        "split",
        "chunk",
        "contiguous",
        "detach",
        "to",
        "as_strided",
        "unbind",
        "view_as",
        "expand_as",
        "movedim",
        "__getitem__",
        operator.getitem,
        torch.reshape,
        torch.transpose,
        torch.permute,
        torch.narrow,
        torch.select,
        torch.unsqueeze,
        torch.squeeze,
        torch.flatten,
        torch.split,
        torch.chunk,
        torch.unbind,
        torch.movedim,
        torch.t,
        torch.detach,
    }
)

# A branch with a convolution works on NCHW tensors: its channels are dimension 1, not the
# last one.
CONVOLUTIONS = frozenset(
    {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, torch.convolution}
)

# Ops that act on one dimension of their first argument as its channels: dimension 1
# (convolutions, NCHW norms) or the last (linear layers, LayerNorm, RMSNorm). The first such
# op a branch applies to the stream says which of the stream's dimensions are its channels.
CHANNELS_FIRST = CONVOLUTIONS | frozenset(
    {F.batch_norm, torch.batch_norm, F.group_norm, torch.group_norm, F.instance_norm}
)
CHANNELS_LAST = frozenset({F.linear, F.layer_norm, torch.layer_norm, F.rms_norm, torch.rms_norm})

# Ops that reorder dimensions without changing values: (x, dim0, dim1) swaps two,
# (x, *dims) / (x, dims) permutes, (x, source, destination) moves one.
TRANSPOSES = frozenset({"transpose", "swapaxes", torch.transpose, torch.swapaxes})
PERMUTES = frozenset({"permute", torch.permute})
MOVEDIMS = frozenset({"movedim", torch.movedim})


def calls_one_of(node: fx.Node, targets: frozenset[object]) -> bool:
    """Whether `node` calls a function in `targets`, or a tensor method named in it."""
    return node.op in ("call_function", "call_method") and node.target in targets


def target_name(node: fx.Node) -> str:
    """The name of what `node` calls (``layer_norm``, ``relu``, ``output``), for reasons a
    user reads."""
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def is_stream_op(node: fx.Node) -> bool:
    return calls_one_of(node, STREAM_OPS)


def is_dropout(node: fx.Node) -> bool:
    return calls_one_of(node, DROPOUTS)


def is_cast(node: fx.Node) -> bool:
    return calls_one_of(node, CASTS)


def is_view(node: fx.Node) -> bool:
    return calls_one_of(node, VIEWS)


def is_convolution(node: fx.Node) -> bool:
    return calls_one_of(node, CONVOLUTIONS)


def is_channels_first(node: fx.Node) -> bool:
    return calls_one_of(node, CHANNELS_FIRST)


def is_channels_last(node: fx.Node) -> bool:
    return calls_one_of(node, CHANNELS_LAST)


def written_into(node: fx.Node) -> fx.Node | None:
    """The node whose tensor `node` writes into: the first argument of an in-place op
    (`mutates_first_arg`) or of an item assignment (``x[i] = y``, ``operator.setitem``)."""
    target = node.args[0] if node.args else None
    if not isinstance(target, fx.Node):
        return None
    writes = mutates_first_arg(node) or (
        node.op == "call_function" and node.target is operator.setitem
    )
    return target if writes else None


def alias_path(node: fx.Node) -> list[fx.Node]:
    """`node`, then each node whose tensor `node`'s may share memory with, back to the one
    that made it: through views (`VIEWS`) and writes (`written_into`), which return the
    tensor they write."""
    path = [node]
    while True:
        source = written_into(node)
        if source is None and is_view(node) and node.args and isinstance(node.args[0], fx.Node):
            source = node.args[0]
        if source is None:
            return path
        node = source
        path.append(node)


def aliases_input_or_view(node: fx.Node) -> bool:
    """Whether writing into `node`'s tensor may write into a graph input or through a view
    into another tensor (`alias_path`)."""
    path = alias_path(node)
    return path[-1].op == "placeholder" or any(is_view(n) for n in path)


def written_through_views(graph: fx.Graph) -> frozenset[fx.Node]:
    """The nodes that made a tensor which some op writes into through a view or by item
    assignment (``x[..., :k] += y``, ``x[mask] = 0``): the write lands in the tensor, but no
    later reader of it depends on the write in the graph."""
    written = set()
    for node in graph.nodes:
        target = written_into(node)
        if target is None:
            continue
        path = alias_path(target)
        if node.target is operator.setitem or any(is_view(n) for n in path):
            written.add(path[-1])
    return frozenset(written)


def mutates_first_arg(node: fx.Node) -> bool:
    """Whether `node` writes into its first argument: ``operator.iadd`` (how Dynamo records
    ``x += y``), a trailing-underscore method (``x.add_(y)``; not a dunder such as
    ``__getitem__``, so ``x.__iadd__(y)`` is not counted), or an ``inplace=True`` keyword
    (``F.relu(x, inplace=True)``)."""
    if node.op == "call_function" and node.target is operator.iadd:
        return True
    if node.op == "call_method" and isinstance(node.target, str):
        return node.target.endswith("_") and not node.target.startswith("__")
    return node.kwargs.get("inplace") is True


# Stream ops that commute with the mean over the streams (dropout and contiguous are the
# identity in eval; a cast does when it widens, `_may_round`). Norms and activations do not,
# nor does a cast that narrows (the mean of n rounded streams is not the rounded mean): a
# chain that lifts one needs its streams to stay copies at init (`Manifold.init_bias`'s
# keep_copies).
AFFINE_STREAM_OPS = DROPOUTS | LAYOUT_CHANGES


def is_affine_stream_op(node: fx.Node) -> bool:
    if is_cast(node):
        return not _may_round(node)
    return calls_one_of(node, AFFINE_STREAM_OPS)


def _may_round(cast: fx.Node) -> bool:
    """Whether `cast` may change a value: its output dtype is not a floating dtype at least as
    precise and as wide in range as its input's (unknown counts as changing)."""
    source, result = (_example_dtype(n) for n in (cast.args[0], cast))
    if source is None or result is None:
        return True
    if not (source.is_floating_point and result.is_floating_point):
        return source != result
    wide, narrow = torch.finfo(source), torch.finfo(result)
    return narrow.eps > wide.eps or narrow.max < wide.max


def _example_dtype(node: object) -> torch.dtype | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None
