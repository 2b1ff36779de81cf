"""What hcpass relies on in how `transformers` builds its models, one behaviour per test.

CI installs the newest transformers (and runs the `hf` tests again on the oldest release
pyproject.toml allows): when a release changes one of these behaviours, the failing test
names it and shows Dynamo's own reason, instead of a converted model that "ran without its
mixers" somewhere else in the suite. transformers 5.25 broke the first one: with `kernels`
installed, every attention layer sets a module-level variable, which Dynamo refuses inside a
checkpoint region ("HOP: Unsafe side effect") unless told to apply it once
(`hcpass.frontend.capture.CAPTURE_SETTINGS`).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from hcpass.frontend.capture import capture
from tests import models

pytestmark = pytest.mark.hf

DECODERS = [
    pytest.param(models.gpt2, "transformer.h", ("attn", "mlp"), id="gpt2"),
    pytest.param(models.llama, "model.layers", ("self_attn", "mlp"), id="llama"),
]


def _captured(model: torch.nn.Module) -> tuple[list[torch.fx.GraphModule], list[str]]:
    """The graphs hcpass captures for one training forward, and every graph break Dynamo
    recorded meanwhile (also those that made it skip a frame, which end no captured graph)."""
    (ids,), _ = models.token_inputs()
    counters["graph_break"].clear()
    graphs = capture(model, (ids,), {"labels": ids})
    return [g.gm for g in graphs], [reason.splitlines()[0] for reason in counters["graph_break"]]


def _regions(gm: torch.fx.GraphModule) -> int:
    return sum(
        node.target is torch.ops.higher_order.tag_activation_checkpoint for node in gm.graph.nodes
    )


def _sites(gm: torch.fx.GraphModule) -> set[str]:
    """Module paths of the layers whose calls the graph holds, from Dynamo's module stacks."""
    return {
        path
        for node in gm.graph.nodes
        for path, _ in (node.meta.get("nn_module_stack") or {}).values()
    }


@pytest.mark.parametrize("factory, layers, branches", DECODERS)
def test_each_decoder_layer_is_traced_whole(factory, layers, branches):
    """hcpass relies on: Dynamo traces each decoder layer -- its attention dispatch included
    -- without a graph break inside it (a residual chain cannot cross one)."""
    graphs, breaks = _captured(factory().train())
    inside = [g for g in graphs if any(f"{layers}.0.{branches[0]}" in p for p in _sites(g))]
    assert len(inside) == 1, (
        f"Dynamo no longer traces {layers}.0 in one graph; its graph breaks: {breaks}"
    )


@pytest.mark.parametrize("factory, layers, branches", DECODERS)
def test_gradient_checkpointing_wraps_each_layer_in_one_traceable_region(factory, layers, branches):
    """hcpass relies on: ``gradient_checkpointing_enable()`` runs each decoder layer's forward
    under ``torch.utils.checkpoint`` (one ``tag_activation_checkpoint`` region per layer, in
    one graph with the rest), and Dynamo traces the region under hcpass's settings."""
    model = factory().train()
    model.gradient_checkpointing_enable()
    graphs, breaks = _captured(model)
    regions, want = sum(_regions(g) for g in graphs), model.config.num_hidden_layers
    assert regions == want, (
        f"{regions} checkpoint regions for {want} layers: "
        f"transformers changed how gradient_checkpointing_enable wraps {layers}, or Dynamo "
        f"broke the graph inside them; its graph breaks: {breaks}"
    )
