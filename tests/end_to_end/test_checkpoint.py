"""Activation checkpointing: sites inside ``torch.utils.checkpoint`` regions (reentrant and
not) and HF ``gradient_checkpointing_enable()`` are rewritten, the gradients equal those of
the same converted model without checkpointing, and checkpointing still saves memory.

Memory is measured as the bytes of the tensors autograd saves for the backward, seen by a
`saved_tensors_hooks` pack hook (measured on the tiny GPT: 190 704 bytes checkpointed vs
355 056 not; HF GPT-2: 197 236 vs 410 484)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import hcpass
from hcpass.tools.demo.gpt import GPT
from tests import models

GRAD_ATOL = 1e-6  # fp32, same ops in the same order: measured 0.0
COMPILED_RTOL = 1e-4  # Inductor vs eager, fp32 (measured 5.7e-6 absolute)


class _ActiveBlock:
    """Python state outside the model that each checkpointed block sets to itself and restores,
    as `kernels.use_kernelized_func` does in every attention layer of transformers >= 5.25.
    Dynamo refuses to trace a module stored there inside a checkpoint region unless told to
    apply the change once (plain values such as a string it traces either way)."""

    block: nn.Module | None = None


_ACTIVE = _ActiveBlock()


class StatefulCheckpointedGPT(models.CheckpointedGPT):
    """`CheckpointedGPT` whose checkpointed blocks record themselves in `_ACTIVE` while they run."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = checkpoint(self._marked, block, x, use_reentrant=False)
        return self.head(self.ln(x))

    @staticmethod
    def _marked(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        previous, _ACTIVE.block = _ACTIVE.block, block
        try:
            return block(x)
        finally:
            _ACTIVE.block = previous


def _trained_mixers(converted: hcpass.ConvertedModule) -> None:
    """Move the mixers off their init so the mixer gradients are not trivially equal."""
    with torch.no_grad():
        for p in converted.mixers.parameters():
            p.add_(0.1 * torch.randn_like(p))


def _step(model: nn.Module, *args, **kwargs) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """Loss, saved-tensor bytes and gradients of one forward + backward."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*args, **kwargs)
        loss = out.loss if hasattr(out, "loss") else out.square().mean()
    loss.backward()
    return loss, saved, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients(got: dict, want: dict, atol: float, rtol: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_blocks_are_rewritten_with_equal_gradients_and_less_saved(reentrant):
    (ids,), _ = models.token_inputs()
    base = models.CheckpointedGPT(reentrant=None)
    plain = hcpass.convert(copy.deepcopy(base), (ids,), streams=4)
    _trained_mixers(plain)
    model = copy.deepcopy(base)
    model.reentrant = reentrant

    report = hcpass.explain(model, (ids,))
    assert [(s.name, s.status) for s in report.rows] == [
        ("blocks.0.attn", "rewritten"),
        ("blocks.0.mlp", "rewritten"),
        ("blocks.1.attn", "rewritten"),
        ("blocks.1.mlp", "rewritten"),
    ]
    converted = hcpass.convert(model, (ids,), streams=4)
    converted.load_state_dict(plain.state_dict())

    loss, saved, grads = _step(converted, ids)
    ref_loss, ref_saved, ref_grads = _step(plain, ids)
    torch.testing.assert_close(loss, ref_loss, atol=GRAD_ATOL, rtol=0)
    _assert_same_gradients(grads, ref_grads, GRAD_ATOL)
    assert saved < 0.6 * ref_saved, (saved, ref_saved)


@pytest.mark.parametrize(
    "family, options", [("hyper-connections", {"streams": 4}), ("attnres", {"block_size": 2})]
)
def test_regions_that_change_python_state_are_rewritten(family, options):
    """A checkpointed block that sets and restores Python state outside the model (what
    broke HF gradient checkpointing with transformers 5.25) is captured whole: every site is
    rewritten, the gradients equal those without checkpointing, and the state ends restored."""
    (ids,), _ = models.token_inputs()
    base = StatefulCheckpointedGPT(reentrant=None)
    unchecked = GPT(replace(models.GPT_CONFIG, layers=2))
    unchecked.load_state_dict(base.state_dict())
    plain = hcpass.convert(unchecked, (ids,), family=family, **options)
    _trained_mixers(plain)

    report = hcpass.explain(base, (ids,), family=family)
    assert [(s.name, s.status) for s in report.rows] == [
        ("blocks.0.attn", "rewritten"),
        ("blocks.0.mlp", "rewritten"),
        ("blocks.1.attn", "rewritten"),
        ("blocks.1.mlp", "rewritten"),
    ], report
    converted = hcpass.convert(base, (ids,), family=family, **options)
    converted.load_state_dict(plain.state_dict())

    loss, saved, grads = _step(converted, ids)
    ref_loss, ref_saved, ref_grads = _step(plain, ids)
    assert _ACTIVE.block is None
    torch.testing.assert_close(loss, ref_loss, atol=GRAD_ATOL, rtol=0)
    _assert_same_gradients(grads, ref_grads, GRAD_ATOL)
    assert saved < ref_saved, (saved, ref_saved)


def test_dropout_in_a_region_is_replayed_when_recomputed():
    """The checkpoint op's own eager kernel does not restore the RNG state on recomputation
    (it expects Inductor to); the converted module's runtime checkpoints with it restored."""
    (ids,), _ = models.token_inputs()
    base = models.CheckpointedGPT(reentrant=None, dropout=0.5)
    plain = hcpass.convert(copy.deepcopy(base), (ids,), streams=2)
    model = copy.deepcopy(base)
    model.reentrant = False
    converted = hcpass.convert(model, (ids,), streams=2)
    converted.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    _, _, grads = _step(converted, ids)
    torch.manual_seed(1)
    _, _, ref_grads = _step(plain, ids)
    _assert_same_gradients(grads, ref_grads, GRAD_ATOL)


@pytest.mark.parametrize(
    "factory, blocks",
    [
        models.hf(models.gpt2, ("transformer.h", "attn", "mlp"), id="gpt2"),
        models.hf(models.llama, ("model.layers", "self_attn", "mlp"), id="llama"),
    ],
    ids=["gpt2", "llama"],
)
def test_hf_gradient_checkpointing_is_rewritten(factory, blocks):
    (ids,), _ = models.token_inputs()
    base = factory().train()
    plain = hcpass.convert(copy.deepcopy(base), (ids,), streams=4)
    _trained_mixers(plain)
    model = copy.deepcopy(base)
    model.gradient_checkpointing_enable()
    report = hcpass.explain(model, (ids,))
    layers, attn, mlp = blocks
    assert [s.name for s in report.rewritten] == [
        f"{layers}.{i}.{branch}" for i in range(2) for branch in (attn, mlp)
    ], report
    converted = hcpass.convert(model, (ids,), streams=4)
    converted.load_state_dict(plain.state_dict())

    loss, saved, grads = _step(converted, ids, labels=ids)
    ref_loss, ref_saved, ref_grads = _step(plain, ids, labels=ids)
    torch.testing.assert_close(loss, ref_loss, atol=GRAD_ATOL, rtol=0)
    _assert_same_gradients(grads, ref_grads, GRAD_ATOL)
    assert saved < 0.6 * ref_saved, (saved, ref_saved)


@pytest.mark.hf
def test_enabling_checkpointing_after_conversion_keeps_the_mixers():
    """The HF Trainer switches checkpointing on after the model is built: the graph captured
    at call time then has regions the convert-time graph did not."""
    (ids,), _ = models.token_inputs()
    converted = hcpass.convert(models.gpt2().train(), (ids,), streams=4)
    _trained_mixers(converted)
    reference = copy.deepcopy(converted)
    converted.gradient_checkpointing_enable()
    assert converted.original.is_gradient_checkpointing
    _, _, grads = _step(converted, ids, labels=ids)
    _, _, ref_grads = _step(reference, ids, labels=ids)
    _assert_same_gradients(grads, ref_grads, GRAD_ATOL)


def test_compiled_checkpoint_regions_match_eager():
    """Under the hcpass backend AOTAutograd lowers the regions (their mixer ops included).
    Two blocks: with shared subgraphs inside the regions, the second site of each block got
    a wrong phi gradient (relative error 1, each parameter's own scale)."""
    (ids,), _ = models.token_inputs()
    model = models.CheckpointedGPT(reentrant=False, layers=2)
    converted = hcpass.convert(model, (ids,), streams=4)
    _trained_mixers(converted)
    eager = copy.deepcopy(converted)
    compiled = torch.compile(converted, backend="hcpass")
    loss, _, _ = _step(compiled, ids)
    grads = {n: p.grad for n, p in converted.named_parameters()}
    ref_loss, _, ref_grads = _step(eager, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=COMPILED_RTOL, atol=0)
    for name, want in ref_grads.items():
        scale = want.abs().max().item()
        torch.testing.assert_close(grads[name], want, rtol=0, atol=COMPILED_RTOL * scale)


def test_a_nested_region_is_listed_as_skipped():
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(8)
            self.mlp = nn.Linear(8, 8)

        def forward(self, x):
            return x + checkpoint(lambda h: self.mlp(self.ln(h)), x, use_reentrant=False)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    report = hcpass.explain(Outer(), (torch.randn(2, 3, 8),))
    assert [(s.status, s.reason.split(":")[0]) for s in report.rows] == [
        ("skipped", "activation-checkpoint region not searched")
    ]
