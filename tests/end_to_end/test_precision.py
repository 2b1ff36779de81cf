"""Mixed precision: a converted model under bf16 autocast computes what the plain model
computes under the same autocast; residuals kept wider than their branch (Mamba's
``residual_in_fp32``) are sites; mixer parameters stay fp32 whatever the module's dtype.

Tolerances: bf16 outputs within rtol 1.6e-2 (bf16's) and atol 1e-2 (one bf16 ulp at
magnitude 1-2: the mixers sum the streams in fp32, and a last-bit fp32 difference flips a
bf16 rounding now and then -- measured: 11 of 256 outputs one ulp apart in the fp32-residual
model, GPT outputs equal bitwise); the fp32 gradients autocast produces within 1e-3 of each
gradient's largest entry (measured: 6e-7)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hcpass
from tests import models

BF16 = {"rtol": 1.6e-2, "atol": 1e-2}
# Gradients under bf16 autocast, relative to the largest: one bf16 rounding (2^-8). The
# mixer ops sum the streams in fp32 in another order than the plain model's add (batched
# matmuls), so an fp32 value one ulp apart can round to the neighbouring bf16 value in the
# branch that reads it; measured 2.5e-3 on GPT-2 (2.7e-7 with the broadcast references).
AUTOCAST_GRAD_RTOL = 2**-8


def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _assert_gradients_close(model: nn.Module, reference: nn.Module, rtol: float) -> None:
    grads = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        if param.grad is None:
            continue
        got, want = grads[name].grad, param.grad
        scale = want.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(got, want, rtol=0, atol=rtol * scale.item(), msg=name)


@pytest.mark.parametrize("converted_in_autocast", [True, False], ids=["inside", "outside"])
@pytest.mark.parametrize(
    "factory", [pytest.param(models.tiny_gpt, id="tiny_gpt"), models.hf(models.gpt2, id="gpt2")]
)
def test_bf16_autocast_forward_and_backward_match_the_plain_model(factory, converted_in_autocast):
    model = factory()
    (ids,), _ = models.token_inputs()
    plain = copy.deepcopy(model)
    if converted_in_autocast:
        with _bf16_autocast():
            converted = hcpass.convert(model, (ids,), streams=4)
    else:
        converted = hcpass.convert(model, (ids,), streams=4)

    with _bf16_autocast():
        out = models.logits(converted(ids))
        ref = models.logits(plain(ids))
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, **BF16)

    out.float().square().mean().backward()
    ref.float().square().mean().backward()
    _assert_gradients_close(converted.original, plain, AUTOCAST_GRAD_RTOL)
    assert converted.mixers[next(iter(converted.mixers))].bias.grad.abs().sum() > 0


def test_the_add_keeps_its_promoted_dtype():
    """fp32 stream + bf16 branch is an fp32 add: the branch is cast up before the merge."""
    (ids,), _ = models.token_inputs()
    with _bf16_autocast():
        converted = hcpass.convert(models.tiny_gpt(layers=1), (ids,), streams=2)
    merge = torch.ops.hcpass.post_res.default
    branches = [n.args[1] for n in converted.graph_module.graph.nodes if n.target is merge]
    assert [(b.op, b.target, b.args[1:]) for b in branches] == [
        ("call_method", "to", (torch.float32,)),
    ] * 2


def test_coefficients_stay_fp32_under_autocast():
    """Custom ops fall through autocast, so without care the projection would run in bf16."""
    from tests.op_inputs import coeffs_inputs

    args = coeffs_inputs("sinkhorn", 4, (2, 3), 64, torch.float32, {})
    expected = torch.ops.hcpass.coeffs(*args)
    with _bf16_autocast():
        got = torch.ops.hcpass.coeffs(*args)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0, atol=0)


class Fp32ResidualBlock(nn.Module):
    """HF MambaBlock with ``residual_in_fp32=True``: the branch runs in the model's dtype
    and reads ``x``; the residual is ``x`` cast to fp32."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mixer = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        h = self.mixer(self.norm(x.to(dtype=self.norm.weight.dtype)))
        residual = residual.to(torch.float32)
        return residual + h


class Fp32Residuals(nn.Module):
    def __init__(self, d: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(models.VOCAB, d)
        self.layers = nn.ModuleList(Fp32ResidualBlock(d) for _ in range(layers))
        self.norm_f = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm_f(x.to(dtype=self.norm_f.weight.dtype))


def test_residual_kept_in_fp32_is_a_site_in_a_bf16_model():
    model = Fp32Residuals().to(torch.bfloat16)
    (ids,), _ = models.token_inputs()
    report = hcpass.explain(model, (ids,))
    assert [(s.name, s.status) for s in report.rows] == [
        ("layers.0", "rewritten"),
        ("layers.1", "rewritten"),
    ]
    converted = hcpass.convert(model, (ids,), streams=4)
    out, ref = converted(ids), model(ids)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, **BF16)
    out.float().sum().backward()
    assert all(m.bias.grad is not None for m in converted.mixers.values())


class RoundedStream(nn.Module):
    """An fp32 model whose stream is cast to `dtype` at every site (``x.bfloat16() + f(x)``)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.norms = nn.ModuleList(nn.LayerNorm(16) for _ in range(3))
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, x):
        for norm, layer in zip(self.norms, self.layers, strict=True):
            x = x.to(self.dtype) + layer(norm(x.float()))
        return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["narrowing", "widening"])
def test_a_cast_on_the_stream_keeps_the_function_at_init(dtype):
    """A narrowing cast rounds each of the n streams, and the mean of rounded streams is not
    the rounded mean: its chain keeps the streams copies at init (measured 1.5e-2 off before).
    A widening cast is exact per stream, so the chain keeps the default init."""
    torch.manual_seed(0)
    model, x = RoundedStream(dtype), torch.randn(2, 5, 16)
    converted = hcpass.convert(model, (x,))
    torch.testing.assert_close(converted(x), model(x), rtol=1e-6, atol=1e-6)
    default_bias = hcpass.convert(RoundedStream(torch.float32), (x,)).mixers["layers_1"].bias
    same_init = torch.equal(converted.mixers["layers_1"].bias, default_bias.to(dtype=torch.float32))
    assert same_init == (dtype == torch.float64)


def test_unrelated_operands_are_not_called_independent():
    """``q * cos + rotate(q) * sin`` reads q twice: the reason says so, not "independent"."""

    class Rotary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(8, 8)

        def forward(self, x):
            q = self.q(x)
            return q * x.cos() + q.flip(-1) * x.sin()

    report = hcpass.explain(Rotary(), (torch.randn(2, 8),))
    assert [s.reason for s in report.skipped] == [
        "neither operand is computed from the other (both read 'q'): not a residual"
    ]


@pytest.mark.parametrize("cast", ["to", "bfloat16", "half"])
def test_to_a_narrow_dtype_keeps_the_mixers_fp32(cast):
    (ids,), _ = models.token_inputs()
    converted = hcpass.convert(models.tiny_gpt(), (ids,), streams=4)
    with torch.no_grad():
        for p in converted.mixers.parameters():
            p.add_(0.1 * torch.randn_like(p))  # values bf16 cannot represent exactly
    before = {n: p.clone() for n, p in converted.mixers.named_parameters()}
    getattr(converted, cast)(*([torch.bfloat16] if cast == "to" else []))
    assert converted.head.weight.dtype in (torch.bfloat16, torch.float16)
    for name, param in converted.mixers.named_parameters():
        assert param.dtype == torch.float32, name
        assert torch.equal(param, before[name]), f"{name} was rounded"
    converted(ids).float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in converted.mixers.parameters())


def test_double_widens_the_mixers_for_gradcheck():
    converted = hcpass.convert(models.tiny_gpt(layers=1), models.token_inputs()[0], streams=2)
    converted.double()
    assert {p.dtype for p in converted.mixers.parameters()} == {torch.float64}
    converted.float()
    assert {p.dtype for p in converted.mixers.parameters()} == {torch.float32}
    # From fp64 straight to a narrow dtype: fp32 again, not fp64 left behind.
    converted.double().to(torch.bfloat16)
    assert {p.dtype for p in converted.mixers.parameters()} == {torch.float32}


@pytest.mark.parametrize("family", ["hyper-connections", "attnres"])
def test_an_fp64_model_gets_fp64_mixers_and_a_bf16_one_fp32(family):
    (ids,), _ = models.token_inputs()
    for dtype, want in [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)]:
        model = models.tiny_gpt(layers=1).to(dtype)
        converted = hcpass.convert(model, (ids,), family=family)
        assert {p.dtype for p in converted.mixers.parameters()} == {want}, dtype
        assert converted(ids).dtype == dtype


@pytest.mark.parametrize("cast", ["bfloat16", "double"])
def test_pseudo_queries_follow_the_mixers_dtype_rules(cast):
    (ids,), _ = models.token_inputs()
    converted = hcpass.convert(models.tiny_gpt(layers=1), (ids,), family="attnres")
    getattr(converted, cast)()
    want = torch.float64 if cast == "double" else torch.float32
    assert {p.dtype for p in converted.mixers.parameters()} == {want}
    assert converted(ids).dtype == converted.head.weight.dtype


@pytest.mark.hf
def test_hf_mamba_residual_in_fp32_sites_are_found():
    """The issue's reproduction: 0 of 2 sites were found, "operands are independent"."""
    from transformers import MambaConfig, MambaForCausalLM

    models._quiet_hf()
    config = MambaConfig(
        vocab_size=models.VOCAB,
        hidden_size=16,
        state_size=4,
        num_hidden_layers=2,
        expand=2,
        residual_in_fp32=True,
    )
    model = MambaForCausalLM(config)
    (ids,), _ = models.token_inputs()
    kwargs = {"use_cache": False}
    report = hcpass.explain(model, (ids,), kwargs)
    assert [s.name for s in report.rewritten] == [
        "backbone.layers.0.mixer",
        "backbone.layers.1.mixer",
    ]
    converted = hcpass.convert(model, (ids,), kwargs, streams=4)
    torch.testing.assert_close(
        converted(ids, **kwargs).logits, model(ids, **kwargs).logits, rtol=1e-5, atol=1e-6
    )
