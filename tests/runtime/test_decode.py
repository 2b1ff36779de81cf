"""Decoding with HF ``generate`` (greedy, KV cache): a converted model generates what the
original does at init, and neither the eager runtime nor ``torch.compile(backend="hcpass")``
captures a graph per generated token -- the KV cache grows by one position each step, so a
graph per length would make every token pay a capture (benchmarks/decode.py measures the
speed).

Token ids are compared exactly: greedy decoding of fp32 logits."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import hcpass
from hcpass import native
from hcpass.manifolds.sinkhorn import UnrolledSinkhorn
from hcpass.ops import decode, library
from hcpass.ops.attnres import library as attnres_library
from tests import models

# Prefill, the first step (cache length static), then the step that marks the length
# dynamic: Dynamo's automatic dynamic shapes, whatever the number of tokens.
GRAPHS_FOR_A_NEW_MODEL = 3


def _generate(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
    """Greedy `tokens` new tokens with the KV cache, and the graphs Dynamo compiled meanwhile."""
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, use_cache=True
        )
    return out, counters["stats"]["unique_graphs"] - before


def _perturbed(converted: hcpass.ConvertedModule, scale: float = 3.0) -> None:
    """Move the mixers off their function-preserving init, so a lost mixer changes tokens."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in converted.mixers.parameters():
            p.add_(torch.randn_like(p) * scale)


@pytest.mark.hf
def test_eager_generate_equals_the_original_at_init_without_a_graph_per_token():
    model = models.gpt2().eval()
    ids = torch.randint(1, models.VOCAB, (1, 5))
    converted = hcpass.convert(model, (ids,))
    want = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    out, graphs = _generate(converted, ids, 8)
    assert torch.equal(out, want)
    assert graphs <= GRAPHS_FOR_A_NEW_MODEL
    out, graphs = _generate(converted, ids, 8)
    assert torch.equal(out, want)
    assert graphs == 0


@pytest.mark.slow
@pytest.mark.hf
def test_compiled_generate_compiles_no_graph_per_token():
    model = models.gpt2().eval()
    ids = torch.randint(1, models.VOCAB, (1, 5))
    converted = hcpass.convert(model, (ids,))
    _perturbed(converted)
    want, _ = _generate(converted, ids, 8)  # the eager runtime
    assert not torch.equal(want, model.generate(ids, max_new_tokens=8, do_sample=False))
    longer = torch.randint(1, models.VOCAB, (1, 9))
    want_longer, _ = _generate(converted, longer, 8)
    # generate is the model's method: compiled as HF documents it, through the forward
    # (on torch.compile(converted) it would run bound to the uncompiled module)
    converted.forward = torch.compile(converted.forward, backend="hcpass")
    out, graphs = _generate(converted, ids, 8)
    assert torch.equal(out, want)
    assert graphs <= GRAPHS_FOR_A_NEW_MODEL
    # A new prompt length recompiles the prefill with its length dynamic; then no more.
    out, graphs = _generate(converted, longer, 8)
    assert torch.equal(out, want_longer)
    assert graphs <= 2
    _, graphs = _generate(converted, torch.randint(1, models.VOCAB, (1, 12)), 8)
    assert graphs == 0


def test_inference_runs_checkpoint_regions_without_torch_checkpoint(monkeypatch):
    """Attention Residuals checkpoints each depth attention; with no gradient there is nothing
    to recompute, and torch.utils.checkpoint's per-call cost is most of a decode step's."""
    (ids,), _ = models.token_inputs()
    converted = hcpass.convert(models.tiny_gpt(), (ids,), family="attnres")
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    )
    trained = converted(ids)
    assert calls  # with gradients, the regions are checkpointed
    calls.clear()
    with torch.no_grad():
        inferred = converted(ids)
    assert not calls
    torch.testing.assert_close(inferred, trained.detach(), rtol=0, atol=0)


def test_sinkhorn_without_gradients_skips_the_autograd_function(monkeypatch):
    """At one position the Function's per-call cost (binding its signature, the node) was
    most of Sinkhorn's time; with nothing to differentiate the op runs alone, same values."""
    manifold = hcpass.manifolds.create("sinkhorn", 4)
    logits = torch.randn(3, manifold.res_logits, requires_grad=True)
    calls = []
    apply = UnrolledSinkhorn.apply
    monkeypatch.setattr(
        UnrolledSinkhorn, "apply", staticmethod(lambda *a: calls.append(1) or apply(*a))
    )
    differentiable = manifold.res_map(logits)
    assert calls
    calls.clear()
    with torch.no_grad():
        inferred = manifold.res_map(logits)
    assert not calls
    torch.testing.assert_close(inferred, differentiable.detach(), rtol=0, atol=0)


# The CPU kernels the hcpass ops run (module globals their bodies call).
OP_KERNELS = {
    library: ("_coeffs_ref", "_pre_cpu", "_post_res_cpu"),
    attnres_library: ("_attnres_ref",),
}


def _count_calls(monkeypatch) -> tuple[list[str], list[str]]:
    """(names of the ops' CPU kernels called, native decode kernels called) from now on."""
    ops, kernels = [], []
    for module, names in OP_KERNELS.items():
        for name in names:
            kernel = getattr(module, name)
            monkeypatch.setattr(
                module, name, lambda *a, _k=kernel, _n=name: ops.append(_n) or _k(*a)
            )
    for name, args in (
        (decode.KERNEL, decode.KERNEL_ARGS),
        (decode.ATTNRES_KERNEL, decode.ATTNRES_KERNEL_ARGS),
    ):
        kernel = native.load(name, args)
        monkeypatch.setitem(
            native._KERNELS, name, lambda *a, _k=kernel, _n=name: kernels.append(_n) or _k(*a)
        )
    return ops, kernels


@pytest.mark.hf
@pytest.mark.parametrize("family", ["hyper-connections", "attnres"])
def test_a_decoding_step_runs_each_sites_mixer_work_as_one_native_call(family, monkeypatch):
    """At one position the ops cost their dispatch, not their arithmetic (~250 us a
    hyper-connection site on CPU, more than the plain model's whole step): the eager runtime
    calls hcpass.ops.decode instead, one kernel call per site (and the chain's last merge)."""
    model = models.gpt2().eval()
    ids = torch.randint(1, models.VOCAB, (1, 5))
    converted = hcpass.convert(model, (ids,), family=family)
    _perturbed(converted)
    want, _ = _generate(converted, ids, 4)  # captures every graph a step needs
    ops, kernels = _count_calls(monkeypatch)
    out, _ = _generate(converted, ids, 4)
    assert torch.equal(out, want)
    sites = len(converted.mixers)
    if family == "hyper-connections":
        # one chain: its first site's read, a merge and read per later site, the last merge
        per_step = [decode.KERNEL] * (sites + 1)
    else:
        # an attention over depth at each site but the first (it reads x_0 alone), and at
        # the chain's output
        per_step = [decode.ATTNRES_KERNEL] * sites
    assert ops == []
    assert kernels == per_step * 4  # the prompt, then 3 steps (the last token is not fed)


@pytest.mark.hf
@pytest.mark.parametrize("family", ["hyper-connections", "attnres"])
def test_the_inference_path_computes_what_the_ops_compute(family):
    """Without gradients the mixers run natively, with gradients the ops (the training path):
    the logits agree to rounding (the projection's and mean squares' summation order)."""
    model = models.gpt2().eval()
    ids = torch.randint(1, models.VOCAB, (2, 7))
    converted = hcpass.convert(model, (ids,), family=family)
    # Off the init, but not so far that fp32 rounding is amplified: with the default scale
    # Sinkhorn's logits reach tens and fp32 and fp64 logits differ by 0.5.
    _perturbed(converted, 0.5)
    trained = converted(ids).logits
    with torch.no_grad():
        inferred = converted(ids).logits
    assert not torch.allclose(trained, model(ids).logits, atol=1e-3)  # the mixers matter
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-5, atol=1e-5)
