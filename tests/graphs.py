"""How the graph tests build a graph by hand (`GraphBuilder`) and read a rewritten graph:
its code with stable names, and its ops by name."""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
from torch import fx

import hcpass  # noqa: F401  (defines the hcpass ops)
from hcpass.frontend.capture import PARAMETER

NAMES = {
    torch.ops.hcpass.coeffs.default: "coeffs",
    torch.ops.hcpass.pre.default: "pre",
    torch.ops.hcpass.post_res.default: "post_res",
    torch.ops.hcpass.post_res_coeffs_pre.default: "post_res_coeffs_pre",
    operator.add: "add",
}


def body(gm: torch.fx.GraphModule) -> str:
    """The graph's code below the signature, without the parameter unpacking lines, with
    the manifold spec (a long string) shortened to SPEC and Dynamo's names made stable
    (`stable_names`): what every expected-graph test compares."""
    code = gm.code.split("):\n", 1)[1]
    for node in gm.graph.nodes:
        if NAMES.get(node.target) in ("coeffs", "post_res_coeffs_pre"):
            code = code.replace(repr(node.args[-1]), "SPEC")
    lines = [line.split(";")[0].strip() for line in code.strip().splitlines()]
    return stable_names("\n".join(line for line in lines if " = L_" not in line))


# Dynamo names a graph input after its source: ``L['self']._modules['ln']._parameters['weight']``
# becomes ``L_self_modules_ln_parameters_weight_`` (the argument) and the local
# ``l_self_modules_ln_parameters_weight_``; ``L['args'][0]`` becomes ``l_args_0_``.
DYNAMO_INPUT = re.compile(r"\b[lL]_\w+")
MODULE_PATH_STEP = re.compile(r"(?:^|_)(?:modules|parameters|buffers)_")
# Spellings of one function that differ between torch versions (the C binding vs the Python
# name), mapped to the Python name.
FUNCTION_SPELLINGS = {"torch._C._nn.": "torch.nn.functional."}


def stable_names(code: str) -> str:
    """Graph code with the spellings that change between torch versions replaced:

    - a parameter or buffer lifted from the model by its name in the model:
      ``l_self_modules_blocks_modules_0_modules_ln_parameters_weight_`` -> ``blocks.0.ln.weight``;
    - another Dynamo input without Dynamo's decoration: ``l_args_0_`` -> ``args_0`` (and the
      stream input hcpass names after it, ``l_args_0__streams``, -> ``args_0_streams``);
    - ``torch._C._nn.linear`` -> ``torch.nn.functional.linear`` (likewise every
      ``torch._C._nn`` function).

    When a torch upgrade changes these spellings again, this is the one place to adapt."""
    for spelling, stable in FUNCTION_SPELLINGS.items():
        code = code.replace(spelling, stable)
    return DYNAMO_INPUT.sub(lambda match: _stable_input(match.group()), code)


def _stable_input(name: str) -> str:
    source = name[2:]
    if source.startswith("self_"):  # an attribute of the model: its dotted path
        return MODULE_PATH_STEP.sub(".", source.removeprefix("self")).strip("._")
    return source.replace("__", "_").strip("_")


def op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """The hcpass ops, additions and method calls in the graph, counted by name."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        name = NAMES.get(node.target) or (node.target if node.op == "call_method" else None)
        if name:
            counts[name] = counts.get(name, 0) + 1
    return counts


class GraphBuilder:
    """An FX graph in torch IR as Dynamo hands it to a backend, written by hand: each node
    carries ``meta["example_value"]`` (the op run on its inputs' values), and a parameter's
    placeholder carries the parameter's name in the model (as `capture.annotate_parameters`
    records it). Parameters come first, as Dynamo lifts them."""

    def __init__(self) -> None:
        self.graph = fx.Graph()

    def input(self, name: str, *shape: int, dtype: torch.dtype = torch.float32) -> fx.Node:
        return self._placeholder(name, torch.randn(shape, dtype=dtype))

    def parameter(self, name: str, *shape: int) -> fx.Node:
        """A parameter's placeholder, named ``blocks.0.ln.weight`` in the model and
        ``blocks_0_ln_weight`` in the graph."""
        node = self._placeholder(name.replace(".", "_"), torch.randn(shape))
        node.meta[PARAMETER] = name
        return node

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self._node("call_function", target, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        return self._node("call_method", name, args, kwargs)

    def linear(self, x: fx.Node, name: str, width: int) -> fx.Node:
        """``F.linear(x, name.weight, name.bias)`` with new parameters, width -> width."""
        weight = self.parameter(f"{name}.weight", width, width)
        bias = self.parameter(f"{name}.bias", width)
        return self.call(torch.nn.functional.linear, x, weight, bias)

    def layer_norm(self, x: fx.Node, name: str, width: int, eps: float = 1e-5) -> fx.Node:
        weight = self.parameter(f"{name}.weight", width)
        bias = self.parameter(f"{name}.bias", width)
        return self.call(torch.nn.functional.layer_norm, x, (width,), weight, bias, eps)

    def output(self, *values: fx.Node) -> fx.Graph:
        """The finished graph, returning `values` as a tuple (as Dynamo's graphs do)."""
        self.graph.output(values)
        self.graph.lint()
        return self.graph

    def _placeholder(self, name: str, value: torch.Tensor) -> fx.Node:
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        # before(None): the graph's start
        with (
            self.graph.inserting_after(placeholders[-1])
            if placeholders
            else (self.graph.inserting_before(None))
        ):
            node = self.graph.placeholder(name)
        node.meta["example_value"] = value
        return node

    def _node(self, op: str, target: Any, args: tuple, kwargs: dict) -> fx.Node:
        node = self.graph.create_node(op, target, args, kwargs)
        values = fx.map_arg((args, kwargs), lambda n: n.meta["example_value"])
        run = target if op == "call_function" else getattr(torch.Tensor, target)
        node.meta["example_value"] = run(*values[0], **values[1])
        return node


def code(graph: fx.Graph) -> str:
    """A hand-built graph's code below the signature (`body`)."""
    return body(fx.GraphModule(torch.nn.Module(), graph))
