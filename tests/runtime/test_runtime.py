"""The converted module's runtime: every call runs as converted or raises, whatever Dynamo's
process-wide state (failed traces, other threads compiling, freed parameter ids), and the
module is an ordinary citizen (pickle, deepcopy, HF generate).

Outputs are fp32; a rerun of the same rewritten graph is compared within 1e-6."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import threading

import pytest
import torch
from torch import nn

import hcpass
from tests import models

FP32 = {"rtol": 1e-6, "atol": 1e-6}


def _perturbed(converted: hcpass.ConvertedModule, scale: float = 0.5) -> None:
    """Move the mixers off their function-preserving init, so a lost mixer shows."""
    with torch.no_grad():
        for p in converted.mixers.parameters():
            p.add_(torch.randn_like(p) * scale)


class Residual(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(self.ln(x))


class TwoBlockClasses(nn.Module):
    """Blocks of two classes in one chain; refuses sequences longer than 12."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(models.VOCAB, d)
        self.blocks = nn.ModuleList([models.tiny_block(d), Residual(d), models.tiny_block(d)])
        self.head = nn.Linear(d, models.VOCAB)
        self.detour = False  # the last block's branch skips its parameters
        self.pause = False  # a graph break between the first two blocks
        self.rescale = False  # an op no stream passes through, between the first two blocks

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > 12:
            raise ValueError("at most 12 tokens")
        x = self.blocks[0](self.emb(ids))
        if self.pause:
            torch._dynamo.graph_break()
        if self.rescale:
            x = x * 1.0
        x = self.blocks[1](x)
        x = x + x * 0.5 if self.detour else self.blocks[2](x)
        return self.head(x)


def _converted() -> tuple[hcpass.ConvertedModule, torch.Tensor]:
    ids = torch.randint(0, models.VOCAB, (2, 8))
    converted = hcpass.convert(TwoBlockClasses(), (ids,))
    _perturbed(converted)
    return converted, ids


@pytest.mark.parametrize(
    "bad",
    [torch.randint(0, models.VOCAB, (2, 16)), torch.randn(2, 8)],
    ids=["model-raises", "wrong-dtype"],
)
def test_an_exception_in_one_forward_leaves_the_model_usable(bad):
    converted, ids = _converted()
    expected = converted(ids)
    with pytest.raises((ValueError, RuntimeError)):
        converted(bad)
    torch.testing.assert_close(converted(ids), expected, **FP32)


def test_a_site_lost_at_recapture_raises_naming_the_site_and_why():
    converted, ids = _converted()
    converted(ids)
    converted.original.detour = True
    with pytest.raises(
        RuntimeError, match=r"site\(s\) blocks_2_attn, blocks_2_mlp ran without their mixers"
    ) as error:
        converted(ids)
    assert "no longer residual sites" in str(error.value)


def test_a_new_graph_break_inside_a_chain_keeps_its_streams():
    converted, ids = _converted()
    expected = converted(ids)
    converted.original.pause = True
    torch.testing.assert_close(converted(ids), expected, **FP32)


def test_a_chain_cut_at_recapture_raises_naming_the_site():
    converted, ids = _converted()
    converted(ids)
    converted.original.rescale = True
    with pytest.raises(
        RuntimeError, match=r"chain\(s\) cut at blocks\.1 \(after blocks\.0\.mlp\)"
    ) as error:
        converted(ids)
    assert "no longer passes through every site" in str(error.value)


def test_a_compile_in_another_thread_does_not_change_an_eager_forward():
    converted, ids = _converted()
    expected = converted(ids)
    compiling, release = threading.Event(), threading.Event()

    def blocking_backend(gm, example_inputs):
        compiling.set()
        release.wait(timeout=60)
        return gm.forward

    other = threading.Thread(
        target=lambda: torch.compile(lambda a: a * 2, backend=blocking_backend)(torch.ones(2))
    )
    other.start()
    try:
        assert compiling.wait(timeout=60)
        assert torch.compiler.is_compiling()  # the process-wide flag the runtime must ignore
        out = converted(ids)
    finally:
        release.set()
        other.join()
    torch.testing.assert_close(out, expected, **FP32)


def test_two_threads_each_running_their_own_converted_model():
    models_and_inputs = [_converted() for _ in range(2)]
    expected = [converted(ids) for converted, ids in models_and_inputs]
    for converted, _ in models_and_inputs:
        converted._fresh_runtime()  # both threads capture at once on their first call
    outputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(i: int) -> None:
        converted, ids = models_and_inputs[i]
        try:
            start.wait(timeout=60)
            outputs[i] += [converted(ids) for _ in range(5)]
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(2):
        assert len(outputs[i]) == 5
        for out in outputs[i]:
            torch.testing.assert_close(out, expected[i], **FP32)


def test_load_state_dict_assign_keeps_every_mixer_on_its_site():
    converted, ids = _converted()
    expected = converted(ids)
    for _ in range(4):
        state = {name: t.clone() for name, t in reversed(converted.state_dict().items())}
        converted.load_state_dict(state, assign=True)
        del state
        gc.collect()  # frees the old parameters: their ids may now name new ones
        torch.testing.assert_close(converted(ids), expected, **FP32)


def _saved_and_loaded(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    "clone",
    [lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy, _saved_and_loaded],
    ids=["pickle", "deepcopy", "torch.save"],
)
def test_pickle_save_and_deepcopy_give_an_independent_working_copy(clone):
    converted, ids = _converted()
    expected = converted(ids)
    copied = clone(converted)
    torch.testing.assert_close(copied(ids), expected, **FP32)
    with torch.no_grad():
        next(iter(copied.mixers.values())).bias.add_(1.0)
    torch.testing.assert_close(converted(ids), expected, **FP32)


def _greedy(converted: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits = converted(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.slow
@pytest.mark.hf
@pytest.mark.parametrize("factory", [models.gpt2, models.llama], ids=["gpt2", "llama"])
def test_generate_runs_the_converted_forward_with_and_without_kv_cache(factory):
    model = factory().eval()
    ids = torch.randint(0, models.VOCAB, (1, 5))
    converted = hcpass.convert(model, (ids,), example_kwargs={"use_cache": False})
    _perturbed(converted, scale=3.0)
    expected = _greedy(converted, ids, steps=3)
    plain = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert not torch.equal(plain, expected)  # the mixers change the tokens: the test can fail
    for use_cache in (False, True):
        out = converted.generate(ids, max_new_tokens=3, do_sample=False, use_cache=use_cache)
        assert torch.equal(out, expected), f"use_cache={use_cache}"


class BreakBeforeHead(nn.Module):
    """A graph break after the chain: the frame Dynamo resumes is shared by every instance."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(models.VOCAB, d)
        self.blocks = nn.ModuleList(Residual(d) for _ in range(2))
        self.head = nn.Linear(d, models.VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        x = x.sum(-1, keepdim=True) * x
        torch._dynamo.graph_break()
        return self.head(x)


@pytest.mark.slow
def test_plain_and_converted_instances_of_one_class_compile_and_alternate():
    ids = torch.randint(0, models.VOCAB, (2, 8))
    plain, source = BreakBeforeHead(), BreakBeforeHead()
    source.load_state_dict(plain.state_dict())
    converted = hcpass.convert(source, (ids,))
    _perturbed(converted)
    expected_plain, expected_converted = plain(ids), converted(ids)
    assert not torch.allclose(expected_plain, expected_converted)
    plain_compiled = torch.compile(plain, backend="hcpass")
    converted_compiled = torch.compile(converted, backend="hcpass")
    # Inductor's fused kernels round differently from eager: fp32 tolerance 1e-4.
    for run, expected in [
        (plain_compiled, expected_plain),
        (converted_compiled, expected_converted),
        (plain, expected_plain),
        (converted, expected_converted),
        (plain_compiled, expected_plain),
        (converted_compiled, expected_converted),
    ]:
        torch.testing.assert_close(run(ids), expected, rtol=1e-4, atol=1e-4)


class ConstantBetweenBreaks(nn.Module):
    """A graph that reads no input: a constant computed between two graph breaks."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.layer = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer(x)
        torch._dynamo.graph_break()
        scale = torch.ones(x.shape[-1]).cumsum(0)
        torch._dynamo.graph_break()
        return x * scale


def test_a_graph_with_no_inputs_converts():
    """It raised IndexError in the rewrite (BART with transformers 5.0 captures one)."""
    x = torch.randn(2, 5, 16)
    model = ConstantBetweenBreaks()
    converted = hcpass.convert(model, (x,))
    assert len(converted.report.rewritten) == 1
    models.assert_computes_like(converted, model, x)


class BreakBeforeChain(nn.Module):
    """A graph break before a pre-norm chain: the frame holding the chain is resumed after the
    break, one code object (and one Dynamo cache) for every instance of the class."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(2))
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.final = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        torch._dynamo.graph_break()
        x = x + self.layers[0](self.norms[0](x))
        x = x + self.layers[1](self.norms[1](x))
        return self.final(x)


def test_instances_of_one_class_converted_with_different_options_alternate():
    """Each runs its own rewrite of the shared frame (it raised "Dynamo reused a graph across
    models converted with different options" for all but the first)."""
    x = torch.randn(2, 5, 16)
    options = [{"streams": 2}, {"streams": 4, "manifold": "hc"}, {"family": "attnres"}]
    converted = [hcpass.convert(BreakBeforeChain(), (x,), **o) for o in options]
    want = []
    for model in converted:
        _perturbed(model)
        torch._dynamo.reset()  # each model alone: its rewrite is the one Dynamo caches
        want.append(model(x))
    torch._dynamo.reset()
    for _ in range(2):
        for model, expected in zip(converted, want, strict=True):
            torch.testing.assert_close(model(x), expected, **FP32)


class Unrolled(nn.Module):
    """Three residual layers with a graph break after each of the first two: Dynamo compiles
    the forward's resume functions on their own, one code object for every instance."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layers[0](x)
        torch._dynamo.graph_break()
        x = x + self.layers[1](x)
        torch._dynamo.graph_break()
        return x + self.layers[2](x)


def test_captures_past_dynamos_recompile_limit_find_every_site_and_break_no_model():
    """More explains and conversions of one class than Dynamo's recompile limit (8): each
    finds the three sites, and every model converted before still runs as converted."""
    x = torch.randn(2, 5, 16)
    limit = torch._dynamo.config.recompile_limit
    first = hcpass.convert(Unrolled(), (x,))
    _perturbed(first)
    want = first(x)
    for _ in range(limit + 2):
        report = hcpass.explain(Unrolled(), (x,))
        assert (len(report.rewritten), report.graphs) == (3, 3)
    more = [hcpass.convert(Unrolled(), (x,)) for _ in range(limit + 2)]
    assert all(len(c.report.rewritten) == 3 for c in more)
    for converted in more:
        torch.testing.assert_close(converted(x), converted.original(x), **FP32)
    torch.testing.assert_close(first(x), want, **FP32)


@pytest.mark.hf
def test_generate_on_an_encoder_decoder_model_says_why_it_is_not_supported():
    """HF's generate runs the encoder on its own, outside the converted forward."""
    args, kwargs = models.seq2seq_inputs()
    converted = hcpass.convert(models.t5().eval(), args, kwargs)
    with pytest.raises(NotImplementedError, match="encoder-decoder model .*get_encoder"):
        converted.generate(args[0], max_new_tokens=2)


def test_a_torch_func_transform_is_refused_before_dynamo_and_leaves_the_class_usable():
    """Dynamo would mark the model's forward (shared by every instance) to run uncompiled
    for good; the check comes first, so the model, and others of its class, still run."""
    x = torch.randn(2, 5, 16)
    converted = hcpass.convert(Unrolled(), (x,))
    _perturbed(converted)
    want = converted(x)
    for transform in (torch.func.grad(lambda x: converted(x).sum()), torch.vmap(converted)):
        with pytest.raises(RuntimeError, match="inside a torch.func transform"):
            transform(x)
    torch.testing.assert_close(converted(x), want, **FP32)
    other = hcpass.convert(Unrolled(), (x,))
    torch.testing.assert_close(other(x), other.original(x), **FP32)


def test_parameters_replaced_after_conversion_are_named_with_what_to_do():
    """functional_call passes other tensors; a parametrization replaces the parameter."""
    x = torch.randn(2, 5, 16)
    converted = hcpass.convert(Unrolled(), (x,))
    params = {n: p.detach() * 2 for n, p in converted.original.named_parameters()}
    with pytest.raises(RuntimeError, match=r"no longer holds layers.0.\w+, .*functional_call"):
        torch.func.functional_call(converted, params, (x,))
    converted(x)  # and the model's own parameters are back
    converted, ids = _converted()
    torch.nn.utils.parametrizations.weight_norm(converted.blocks[1].lin)
    with pytest.raises(RuntimeError, match=r"parametrization.* must come before hcpass.convert"):
        converted(ids)


def test_replacing_a_root_parameter_buffer_or_layer_reaches_the_forward():
    """The converted module registers the original root's entries on itself; the forward
    runs the original. load_state_dict(assign=True), .to() (new buffers), a new layer and a
    write into `_modules` (quantize_dynamic) must reach it (measured 1.63 off before)."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(16))
            self.register_buffer("shift", torch.zeros(16))
            self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            x = x * self.scale + self.shift
            for layer in self.layers:
                x = x + layer(x)
            return self.head(x)

    x = torch.randn(4, 16)
    converted = hcpass.convert(Scaled(), (x,))
    state = {k: v.clone() for k, v in converted.state_dict().items()}
    state["scale"], state["shift"] = torch.full((16,), 2.0), torch.ones(16)
    copied = copy.deepcopy(converted)
    copied.load_state_dict(state)
    converted.load_state_dict(state, assign=True)
    torch.testing.assert_close(converted(x), copied(x), rtol=0, atol=0)
    converted(x).sum().backward()
    assert converted.scale.grad is not None  # the parameter the optimizer holds trains
    converted.double()
    assert converted.original.shift.dtype == torch.float64
    converted(x.double())
    converted.float()
    converted.head = nn.Linear(16, 5)
    assert converted(x).shape == (4, 5)
    converted._modules["head"] = nn.Linear(16, 7)
    assert converted(x).shape == (4, 7)
    converted.original.head = nn.Linear(16, 2)  # a change on the original's side wins too
    assert converted(x).shape == (4, 2) and converted.head.out_features == 2


def test_a_second_derivative_through_the_mixers_names_the_cause():
    """A gradient with create_graph=True works; differentiating it again stops with why."""
    x = torch.randn(2, 5, 16, requires_grad=True)
    converted = hcpass.convert(Unrolled(), (x,))
    (grad,) = torch.autograd.grad(converted(x).square().sum(), x, create_graph=True)
    (plain,) = torch.autograd.grad(converted.original(x).square().sum(), x)
    torch.testing.assert_close(grad, plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="second derivative through a converted model"):
        grad.square().sum().backward()


def test_hooks_registered_after_the_first_call_run():
    """Dynamo guards on the modules' hooks for the converted forward (by default it does not,
    and a cached graph would skip a new hook: measured 0 of 3 hooks ran)."""
    converted, ids = _converted()
    converted(ids)
    ran: list[str] = []
    handles = [
        converted.blocks[0].register_forward_pre_hook(lambda m, a: ran.append("pre")),
        converted.blocks[1].register_forward_hook(lambda m, a, o: ran.append("forward")),
        converted.blocks[1].register_full_backward_hook(lambda m, gi, go: ran.append("back")),
    ]
    converted(ids).sum().backward()
    assert sorted(ran) == ["back", "forward", "pre"]
    for handle in handles:
        handle.remove()
    without = converted(ids)
    # One that changes a block's output between two sites is seen, and cuts the chain.
    handle = converted.blocks[1].register_forward_hook(lambda m, a, o: o * 2)
    with pytest.raises(RuntimeError, match=r"blocks.2.attn"):
        converted(ids)
    handle.remove()
    torch.testing.assert_close(converted(ids), without, **FP32)


@pytest.mark.parametrize("family", ["hyper-connections", "attnres"])
def test_a_model_converted_on_the_meta_device_materialises_with_reset_parameters(family):
    """The torchtitan / FSDP2 recipe: build and convert on meta, `to_empty`, then every
    module's `reset_parameters` (the mixers' gives back their function-preserving init; they
    held uninitialised memory before, NaN outputs)."""
    (ids,), _ = models.token_inputs()
    with torch.device("meta"):
        model = models.tiny_gpt()
    converted = hcpass.convert(model, (ids.to("meta"),), family=family)
    converted.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in converted.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    torch.testing.assert_close(converted(ids), converted.original(ids), rtol=1e-5, atol=1e-5)
