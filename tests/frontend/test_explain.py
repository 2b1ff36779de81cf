"""`hcpass.explain` reports every same-shape add with a status and a reason, and bad
input fails with a message that says what is wrong."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import hcpass
from tests import models


class Spellings(nn.Module):
    """``+``, ``+=``, ``torch.add(alpha=)``, ``Tensor.add``, post-activation, a mask add."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        x = torch.relu(x)
        x = x + self.a(x)
        x += self.b(x)
        x = torch.add(x, self.c(x), alpha=0.5)
        x = torch.relu(x.add(self.d(x)))
        return x + torch.ones(8)  # a broadcasting add: not a candidate at all


class Elementwise(nn.Module):
    def forward(self, x):
        return x + 0.5 * x * x


class GraphBreak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = x + self.a(x)
        torch._dynamo.graph_break()
        return x + self.b(x)


class BreakBetweenChains(nn.Module):
    """The break falls between two chains: neither is cut."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = x + self.a(x)
        y = self.proj(x)
        torch._dynamo.graph_break()
        return y + self.b(y)


def _table(report: hcpass.Report) -> list[tuple[str, str]]:
    return [(s.name, s.status) for s in report.rows]


def test_every_spelling_of_the_residual_add_is_found():
    report = hcpass.explain(Spellings(), (torch.randn(2, 8),))
    assert _table(report) == [
        ("a", "rewritten"),
        ("b", "rewritten"),
        ("c", "rewritten"),
        ("d", "rewritten"),
    ]


def test_the_table_has_name_status_and_reason_columns():
    text = str(hcpass.explain(models.tiny_gpt(), models.token_inputs()[0]))
    assert text.splitlines()[0].split() == ["site", "status", "reason"]
    assert "blocks.0" in text and "blocks.1.mlp" in text
    assert "4 rewritten, 0 skipped, 1 graph(s), 0 graph break(s)" in text


@pytest.mark.hf
def test_hf_skips_are_explained():
    report = hcpass.explain(models.llama(), models.token_inputs()[0])
    assert [s.name for s in report.rewritten] == [
        "model.layers.0.self_attn",
        "model.layers.0.mlp",
        "model.layers.1.self_attn",
        "model.layers.1.mlp",
    ]
    rotary = [s for s in report.skipped if "embed" in s.node]
    assert rotary and all(s.reason for s in rotary)


def test_projection_shortcut_ends_the_chain():
    report = hcpass.explain(models.ResNet(), models.image_inputs()[0])
    assert _table(report) == [
        ("layer1.0", "rewritten"),
        ("layer1.1", "rewritten"),
        ("layer2.0:out_8", "skipped"),
        ("layer2.1", "rewritten"),
    ]
    assert "projection shortcut" in report.skipped[0].reason


class SharedAttentionBias(nn.Module):
    """T5's attention before transformers 5.15: a bias computed once and added to every
    layer's scores (``scores += bias``). From the second layer on the scores depend on the
    bias through the hidden states, so ``bias + scores`` looks like a residual of the bias."""

    def __init__(self, width: int = 16, heads: int = 2, length: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.bias = nn.Parameter(torch.randn(heads, length, length))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(2))
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(2))
        self.out = nn.ModuleList(nn.Linear(width, width) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        bias = self.bias * torch.ones(b, 1, 1, 1)
        for norm, qkv, out in zip(self.norms, self.qkv, self.out, strict=True):
            q, k, v = qkv(norm(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-1, -2) + bias
            x = x + out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c))
        return x


def test_a_bias_shared_by_the_layers_is_not_a_stream():
    model, x = SharedAttentionBias(), torch.randn(2, 8, 16)
    report = hcpass.explain(model, (x,))
    assert [(name.split(":")[0], status) for name, status in _table(report)] == [
        ("root", "skipped"),
        ("out.0", "rewritten"),
        ("root", "skipped"),
        ("out.1", "rewritten"),
    ], report
    assert "only through the stream of another chain" in report.rows[2].reason
    models.assert_computes_like(hcpass.convert(model, (x,), streams=4), model, x)


def test_elementwise_expression_is_not_a_block():
    report = hcpass.explain(Elementwise(), (torch.randn(2, 8),))
    assert report.rows[0].status == "skipped"
    assert "reads no parameters" in report.rows[0].reason


def test_a_chain_continues_across_a_graph_break():
    report = hcpass.explain(GraphBreak(), (torch.randn(2, 8),))
    assert report.graphs == 2 and len(report.graph_breaks) == 1
    assert [(s.name, s.status) for s in report.rows] == [("a", "rewritten"), ("b", "rewritten")]
    assert report.rows[1].reason == (
        "continues the chain of a across a graph break (its n streams are handed over)"
    )


def test_graph_break_between_chains_keeps_both():
    model = BreakBetweenChains()
    x = torch.randn(2, 8)
    report = hcpass.explain(model, (x,))
    assert [s.status for s in report.rows] == ["rewritten", "skipped"] or [
        s.status for s in report.rows
    ] == ["rewritten", "rewritten"]
    converted = hcpass.convert(model, (x,))
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-6)


def test_explain_leaves_model_state_alone():
    model = models.ResNet().train()
    x = models.image_inputs()[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    hcpass.explain(model, x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_report_to_dict_is_json_ready():
    import json

    report = hcpass.explain(models.tiny_gpt(), models.token_inputs()[0])
    data = json.loads(json.dumps(report.to_dict()))
    assert {"name", "status", "reason", "graph", "node"} <= set(data["sites"][0])


def test_report_sites_was_renamed_to_rows_and_the_old_name_says_so():
    rows = [hcpass.SiteReport("a", "rewritten", "", 0, "add")]
    report = hcpass.Report(rows, graphs=1, graph_breaks=[])
    assert report.rows == rows
    with pytest.raises(AttributeError, match=r"renamed to Report\.rows.*use report\.rows"):
        _ = report.sites


def test_a_report_pickled_before_the_rename_loads_with_its_rows():
    # `torch.save(converted)` from before the rename stored the report's rows as "sites"
    import pickle

    rows = [hcpass.SiteReport("a", "rewritten", "", 0, "add")]
    current = pickle.dumps(hcpass.Report(rows, graphs=1, graph_breaks=[]), protocol=0)
    saved = current.replace(b"Vrows\n", b"Vsites\n")
    assert saved != current
    loaded = pickle.loads(saved)
    assert (loaded.rows, loaded.graphs, loaded.rewritten) == (rows, 1, rows)


# ----------------------------------------------------------------------------- bad input
class NoResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.f(x))


def test_no_residual_sites_says_what_was_looked_for():
    with pytest.raises(ValueError, match="no residual sites.*x \\+ f\\(x\\)"):
        hcpass.convert(NoResidual(), (torch.randn(2, 8),))


class BreakInTheLoop(nn.Module):
    """A graph break inside the loop over the blocks: Dynamo runs the whole forward eagerly."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
            torch._dynamo.graph_break()
        return x


def test_a_forward_dynamo_captured_nothing_of_is_named_as_the_cause():
    x = torch.randn(2, 8)
    report = hcpass.explain(BreakInTheLoop(), (x,))
    assert report.graphs == 0
    assert "Dynamo captured no graph of the forward" in str(report)
    with pytest.raises(ValueError, match="cannot convert BreakInTheLoop: Dynamo captured no"):
        hcpass.convert(BreakInTheLoop(), (x,))


def test_unknown_manifold_lists_valid_names():
    with pytest.raises(ValueError, match="unknown manifold 'sinkhorm'.*sinkhorn"):
        hcpass.convert(models.tiny_gpt(), models.token_inputs()[0], manifold="sinkhorm")


@pytest.mark.parametrize("streams", [0, -1, 2.5, True])
def test_bad_stream_count(streams):
    with pytest.raises(ValueError, match="streams must be an integer >= 1"):
        hcpass.convert(models.tiny_gpt(), models.token_inputs()[0], streams=streams)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="unknown option.*sinkhorn_iter"):
        hcpass.convert(models.tiny_gpt(), models.token_inputs()[0], sinkhorn_iter=5)


def test_not_a_module_and_double_conversion():
    with pytest.raises(TypeError, match="nn.Module"):
        hcpass.convert(lambda x: x, (torch.randn(2),))
    converted = hcpass.convert(models.tiny_gpt(), models.token_inputs()[0])
    with pytest.raises(ValueError, match="already converted"):
        hcpass.convert(converted, models.token_inputs()[0])


@pytest.mark.parametrize("how", ["torch.compile", "model.compile"])
def test_a_compiled_model_is_refused_with_what_to_do(how):
    """It converted, then its first call failed: the converted forward ran the compiled
    root as a region compiled by another backend ("0 of 4 mixer runs happened")."""
    model = models.tiny_gpt()
    if how == "torch.compile":
        model = torch.compile(model)
    else:
        model.compile()
    with pytest.raises(ValueError, match="convert the model before compiling it"):
        hcpass.convert(model, models.token_inputs()[0])


def test_a_model_holding_a_converted_submodule_names_it():
    x = torch.randn(2, 8)
    outer = nn.Sequential(nn.Linear(8, 8), PerLayerGates())
    outer[1] = hcpass.convert(outer[1], (x,))
    for api in (hcpass.explain, hcpass.convert):
        with pytest.raises(ValueError, match="submodule '1' of this model is already converted"):
            api(outer, (x,))


def test_nan_input_propagates_instead_of_failing_silently():
    model = models.tiny_gpt()
    converted = hcpass.convert(model, models.token_inputs()[0])
    emb = converted.tok.weight
    with torch.no_grad():
        emb[3] = float("nan")
    out = converted(torch.full((1, 4), 3))
    assert torch.isnan(out).all()


def test_streams_one_is_the_plain_residual():
    model = models.tiny_gpt()
    x = models.token_inputs()[0]
    converted = hcpass.convert(model, x, streams=1)
    torch.testing.assert_close(converted(*x), model(*x), rtol=1e-5, atol=1e-6)


def test_manifolds_lists_names_and_descriptions():
    names = hcpass.available_manifolds()
    assert "sinkhorn (mhc)" in names and all(isinstance(d, str) and d for d in names.values())
    import hcpass.manifolds as registry

    assert registry.create("mhc", 2).name == "sinkhorn"


def test_plain_model_under_hcpass_backend_logs_and_matches_inductor(caplog):
    model = models.tiny_gpt().eval()
    x = models.token_inputs()[0]
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="hcpass"):
        out = torch.compile(model, backend="hcpass")(*x)
    lines = [r.getMessage() for r in caplog.records if "residual site" in r.getMessage()]
    assert (
        len(lines) == 1 and "found 4 residual site(s)" in lines[0] and "hcpass.convert" in lines[0]
    )
    torch.testing.assert_close(out, model(*x), rtol=1e-5, atol=1e-5)
    assert not any("mixers" in n for n, _ in model.named_parameters())


class PerLayerGates(nn.Module):
    """``x + g * f(x)`` with the gates in a ParameterList, and one gate on the root."""

    def __init__(self) -> None:
        super().__init__()
        self.fs = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.gates = nn.ParameterList(nn.Parameter(torch.full((8,), 0.5)) for _ in range(2))
        self.gate = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        for f, g in zip(self.fs, self.gates, strict=True):
            x = x + g * f(x)
        return x + self.gate * self.fs[0](x)


def test_sites_keyed_on_a_list_of_parameters_or_a_root_parameter_are_named_after_it():
    """Their owner (the ParameterList, the root) is shared by every layer: the site is named
    after the parameter, so each row of `explain` names its own mixer."""
    x = torch.randn(2, 8)
    names = [s.name for s in hcpass.explain(PerLayerGates(), (x,)).rows]
    assert names == ["gates.0", "gates.1", "gate"]
    assert list(hcpass.convert(PerLayerGates(), (x,)).mixers) == ["gates_0", "gates_1", "gate"]


class TwoResidualsInOneModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


class SharedNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = TwoResidualsInOneModule()
        self.blk = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))

    def forward(self, x):
        x = self.inner(x)
        x = x + self.blk(x)
        return x + self.blk(x)  # the weight-shared block again: a mixer of its own


def test_sites_that_would_share_a_name_are_told_apart():
    """By their leaf layers where those differ, else by a call count; each row of `explain`
    names its own mixer."""
    x = torch.randn(2, 8)
    names = [s.name for s in hcpass.explain(SharedNames(), (x,)).rows]
    assert names == ["inner.a", "inner.b", "blk", "blk#2"]
    keys = list(hcpass.convert(SharedNames(), (x,)).mixers)
    assert keys == ["inner_a", "inner_b", "blk", "blk_2"]


class ResidualAcrossAView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix, self.f = nn.Linear(16, 16), nn.Linear(8, 8)

    def forward(self, x):
        flat = x.view(2, -1) + self.mix(x.reshape(2, -1))
        return x.detach() + self.f(x), flat


def test_a_residual_across_a_view_or_detach_is_skipped_with_that_reason():
    report = hcpass.explain(ResidualAcrossAView(), (torch.randn(2, 2, 8),))
    reasons = [s.reason for s in report.rows]
    assert reasons == [
        "the stream operand is view() of the value the branch reads, not that value: a "
        "residual across a view, reshape or detach is not rewritten",
        "the stream operand is detach() of the value the branch reads, not that value: a "
        "residual across a view, reshape or detach is not rewritten",
    ]
