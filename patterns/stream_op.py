"""Per-position ops that may sit on a residual stream between two sites.

Post-norm blocks (``ln(x + f(x))``), post-activation blocks (``relu(out + x)``), dropout and
dtype casts keep the stream's shape and treat every batch element independently. The
rewrite applies them to all n streams at once by folding the stream dimension into the
batch dimension, so an op qualifies only if it never mixes batch elements.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import fx


class StreamOpPattern:
    """Ops whose first argument is the stream; other tensor arguments must be constants or
    parameters (checked by the caller)."""

    op: ClassVar[str] = "call_function"
    targets: ClassVar[frozenset[object]]

    def matches(self, node: fx.Node) -> bool:
        return node.op == self.op and node.target in self.targets


class Normalization(StreamOpPattern):
    # batch_norm is absent on purpose: in training it computes statistics across the batch,
    # which with streams folded into the batch would mix streams.
    targets = frozenset({F.layer_norm, F.rms_norm, F.group_norm, torch.layer_norm})


class Activation(StreamOpPattern):
    targets = frozenset(
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
            F.dropout,
            torch.dropout,
            F.alpha_dropout,
        }
    )


class ActivationMethod(StreamOpPattern):
    op = "call_method"
    targets = frozenset({"relu", "relu_", "tanh", "sigmoid", "contiguous"})


class Cast(StreamOpPattern):
    """Dtype conversions. Besides sitting between sites, a cast may stand between a chain's
    input and its first add: Mamba's ``residual = x.to(torch.float32)`` keeps the residual
    in fp32 while the branch reads ``x`` (`hcpass.sites` looks through casts there)."""

    op = "call_method"
    targets = frozenset({"to", "type", "type_as", "float", "double", "half", "bfloat16"})


# Add a kind of per-position op: append an instance.
PATTERNS: list[StreamOpPattern] = [Normalization(), Activation(), ActivationMethod(), Cast()]


def is_stream_op(node: fx.Node) -> bool:
    return any(pattern.matches(node) for pattern in PATTERNS)


def is_cast(node: fx.Node) -> bool:
    return Cast().matches(node)


# Stream ops that commute with the mean over the streams (casts up to rounding; dropout and
# contiguous are the identity in eval). The others (norms, activations) do not: a chain that
# lifts one needs its streams to stay copies at init (`Manifold.init_bias`'s keep_copies).
_AFFINE = frozenset({F.dropout, torch.dropout, F.alpha_dropout, "contiguous"})


def is_affine_stream_op(node: fx.Node) -> bool:
    return is_cast(node) or (is_stream_op(node) and node.target in _AFFINE)
