"""Mixers learn under the default init and `hcpass.param_groups` (issue 10: with H_res
starting at the identity's saturated logits, constrained mixers did not move in a run; with
the streams starting as copies, a doubly stochastic H_res got no gradient until training
had separated them), and the default init keeps the converted model equal to the original."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hcpass
from hcpass.tools.demo.gpt import GPT, GPTConfig
from tests.factories import tiny_gpt

CONSTRAINED = ("sinkhorn", "permutation", "kronecker", "spectral", "stiefel", "grassmann")


def gpt_batch(layers: int = 2) -> tuple[GPT, tuple, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(context=16, width=32, layers=layers, heads=2))
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randint(0, 256, (8, 16), generator=gen),)
    targets = torch.randint(0, 256, (8, 16), generator=gen)
    return model, inputs, targets


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", [*CONSTRAINED, "hc"])
def test_default_init_preserves_function_with_unequal_streams(name: str) -> None:
    # The default init reads the mean of the streams (uniform H_pre) and adds the branch to
    # the mean (H_post of mean 1), so the model is unchanged while the streams differ.
    model, inputs, _ = gpt_batch(layers=3)
    model.eval()
    converted = hcpass.convert(model, inputs, streams=4, manifold=name).eval()
    assert rel_err(converted(*inputs), model(*inputs)) <= 1e-5
    cosine = [s["stream_cosine"].mean().item() for s in hcpass.mixers(converted, inputs).values()]
    if name != "hc":  # hc keeps the paper's init (copies until trained)
        assert max(cosine[1:]) < 1 - 1e-4, cosine


class PostNorm(nn.Module):
    """``x = layer_norm(x + f(x))`` blocks: the chain lifts a LayerNorm onto every stream."""

    def __init__(self, width: int = 16, blocks: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.fs = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for f, norm in zip(self.fs, self.norms, strict=True):
            x = norm(x + torch.tanh(f(x)))
        return x


def test_post_norm_chain_keeps_copies() -> None:
    # mean_i LN(X_i) is not LN(mean_i X_i): a chain that lifts a nonlinear op must start
    # with its streams copies, or the converted model would differ from the original.
    torch.manual_seed(0)
    model = PostNorm().eval()
    inputs = (torch.randn(4, 5, 16),)
    converted = hcpass.convert(model, inputs, streams=4).eval()
    assert rel_err(converted(*inputs), model(*inputs)) <= 1e-5
    for mixer in converted.mixers.values():
        assert torch.equal(mixer.bias[4:8], torch.zeros(4))  # H_post = 1 for every stream


def position_mean_h_res(model: hcpass.ConvertedModule, inputs: tuple) -> list[torch.Tensor]:
    return [s["h_res"].flatten(0, -3).mean(0) for s in hcpass.mixers(model, inputs).values()]


@pytest.mark.parametrize("name", CONSTRAINED)
def test_h_res_moves_in_a_few_steps(name: str) -> None:
    # Two blocks: a doubly stochastic H_res at the chain's first site only ever mixes copies,
    # and at its last only feeds the mean; neither gets a gradient. The four sites between
    # two blocks include two that do.
    model, inputs, targets = gpt_batch(layers=2)
    converted = hcpass.convert(model, inputs, streams=4, manifold=name)
    before = position_mean_h_res(converted, inputs)
    optimizer = torch.optim.AdamW(hcpass.param_groups(converted, lr=1e-2))
    for _ in range(10):
        loss = F.cross_entropy(converted(*inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = position_mean_h_res(converted, inputs)
    moved = [(a - b).abs().sum(-1).mean().item() for a, b in zip(after, before, strict=True)]
    # L1 per row, mean over sites; init="identity-sharp" moves ~3e-4 here.
    assert sum(moved) / len(moved) > 1e-2, moved


def test_param_groups_scale_the_mixers_only() -> None:
    model, inputs = tiny_gpt()
    plain_groups = hcpass.param_groups(model, lr=1.0, weight_decay=0.1)
    assert [g["weight_decay"] for g in plain_groups] == [0.1, 0.0]
    converted = hcpass.convert(model, inputs, streams=2)
    groups = hcpass.param_groups(converted, lr=1.0, weight_decay=0.1, mixer_lr_scale=5.0)
    assert [g["lr"] for g in groups] == [1.0, 1.0, 5.0, 5.0]
    # The mixers' bias logits do not decay (0 is not their init); phi and alpha decay like
    # the weights, towards their init (0 and 0.01): unbounded, they saturate H_res.
    named = dict(converted.named_parameters())
    biases = {id(p) for n, p in named.items() if n.startswith("mixers.") and n.endswith(".bias")}
    dynamic = {id(p) for n, p in named.items() if n.endswith((".phi", ".alpha"))}
    assert len(dynamic) == 2 * len(biases) > 0
    assert {id(p) for p in groups[2]["params"]} == biases and groups[2]["weight_decay"] == 0.0
    assert {id(p) for p in groups[3]["params"]} == dynamic and groups[3]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in groups) == len(list(converted.parameters()))
    static = hcpass.convert(model, inputs, streams=2, dynamic=False)
    assert [g["weight_decay"] for g in hcpass.param_groups(static, lr=1.0, weight_decay=0.1)] == [
        0.1, 0.0, 0.0
    ]  # fmt: skip
    with pytest.raises(ValueError, match="mixer_lr_scale"):
        hcpass.param_groups(converted, lr=1.0, mixer_lr_scale=0)
    # Wrapped (torch.compile, as hcpass.compile returns; DDP likewise): the same groups.
    wrapped = hcpass.param_groups(torch.compile(converted, backend="hcpass"), lr=1.0)
    assert [{id(p) for p in g["params"]} for g in wrapped] == [
        {id(p) for p in g["params"]} for g in hcpass.param_groups(converted, lr=1.0)
    ]


class PreThenPostNorm(PostNorm):
    """Pre-norm blocks, a graph break, then post-norm blocks: one chain across two graphs."""

    def __init__(self, width: int = 16, blocks: int = 2) -> None:
        super().__init__(width, blocks)
        self.pre = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for f in self.pre:
            x = x + f(torch.tanh(x))
        torch._dynamo.graph_break()
        for f, norm in zip(self.fs, self.norms, strict=True):
            x = norm(x + torch.tanh(f(x)))
        return x


def test_sites_before_a_post_norm_across_a_graph_break_keep_copies() -> None:
    torch.manual_seed(0)
    model = PreThenPostNorm().eval()
    inputs = (torch.randn(4, 5, 16),)
    converted = hcpass.convert(model, inputs, streams=4).eval()
    assert rel_err(converted(*inputs), model(*inputs)) <= 1e-5
    assert converted.report.graphs == 2
    for key, mixer in converted.mixers.items():
        assert torch.equal(mixer.bias[4:8], torch.zeros(4)), key
