"""torch.export of a converted model: the program computes what the converted model does, at
batch and sequence sizes other than the example's, and runs without hcpass (saved and loaded
in a fresh process, or compiled by AOTInductor).

Tolerances (fp32): the exported program <= 1e-6 of the output's largest magnitude (it records
the mixer ops' plain-PyTorch references; the eager model runs C++ kernels for some of them,
so the two differ by float rounding only: ~2e-7 measured); an AOTInductor package <= 1e-5
(Inductor fuses and reorders the reductions).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

import hcpass
from tests.models import VOCAB, gpt2, llama, logits, tiny_gpt, vit, zoo

EXPORT_RTOL = 1e-6
COMPILED_RTOL = 1e-5
FAMILIES = ["hyper-connections", "attnres"]


def _perturb(converted: nn.Module) -> None:
    """Move every mixer off its init, where the converted model computes what the plain one
    does: a comparison there would not see a program that dropped the mixers."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in converted.mixers.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    return ((got - want).abs().max() / want.abs().max()).item()


def _tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length))


def _images(batch: int, length: int) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16)


# name -> (factory, input name, make inputs(batch, length), extra kwargs, dims of the input)
MODELS = {
    "tiny_gpt": (tiny_gpt, "ids", _tokens, {}, ("batch", "length")),
    "gpt2": (gpt2, "input_ids", _tokens, {"use_cache": False}, ("batch", "length")),
    "llama": (llama, "input_ids", _tokens, {"use_cache": False}, ("batch", "length")),
    "vit": (vit, "pixel_values", _images, {}, ("batch",)),
}
OTHER_SHAPES = [(3, 5), (2, 12)]  # (batch, length) besides the example's (2, 8)


def _convert(name: str, **options):
    factory, input_name, make, kwargs, dims = MODELS[name]
    model = factory().eval()
    converted = hcpass.convert(model, (make(2, 8),), kwargs, **options)
    _perturb(converted)
    return converted, input_name, make, kwargs, dims


def _export(
    converted: nn.Module, input_name: str, example, kwargs: dict, dims, strict: bool = False
) -> object:
    sizes = {"batch": Dim("batch", max=64), "length": Dim("length", max=64)}
    shapes = {input_name: {i: sizes[d] for i, d in enumerate(dims)}, **dict.fromkeys(kwargs)}
    return torch.export.export(converted, (example,), kwargs, dynamic_shapes=shapes, strict=strict)


def _assert_program_computes_converted(program, converted, make, kwargs) -> None:
    for batch, length in OTHER_SHAPES:
        x = make(batch, length)
        want = logits(converted(x, **kwargs))
        got = logits(program.module()(x, **kwargs))
        plain = logits(converted.original(x, **kwargs))
        # the mixers change the output: a program without them would fail below
        assert _relative_error(plain, want) > 1e-3
        assert _relative_error(got, want) <= EXPORT_RTOL, (batch, length)


def _hcpass_ops(program) -> list[str]:
    return [
        str(node.target)
        for node in program.graph.nodes
        if node.op == "call_function" and "hcpass" in str(node.target)
    ]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", zoo(MODELS))
def test_exported_program_computes_the_converted_model_at_new_sizes(name, family):
    options = {"sinkhorn_iters": 3} if family == "hyper-connections" else {}
    converted, input_name, make, kwargs, dims = _convert(name, family=family, **options)
    program = _export(converted, input_name, make(2, 8), kwargs, dims)
    assert _hcpass_ops(program) == []  # the mixer math is ATen
    _assert_program_computes_converted(program, converted, make, kwargs)


@pytest.mark.hf
def test_checkpointed_blocks_export_with_their_mixer_math_as_aten():
    """HF gradient checkpointing in train mode: the sites' mixer ops lie in checkpoint bodies."""
    model = gpt2()
    model.gradient_checkpointing_enable()
    kwargs = {"use_cache": False}
    converted = hcpass.convert(model.train(), (_tokens(2, 8),), kwargs, sinkhorn_iters=3)
    _perturb(converted)
    program = _export(converted, "input_ids", _tokens(2, 8), kwargs, ("batch", "length"))
    assert _hcpass_ops(program) == []
    _assert_program_computes_converted(program, converted, _tokens, kwargs)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("manifold", hcpass.manifolds.manifold_names())
def test_every_manifold_exports(manifold, dynamic):
    model = tiny_gpt(layers=1).eval()
    options = {"sinkhorn_iters": 3} if manifold == "sinkhorn" else {}
    converted = hcpass.convert(
        model, (_tokens(2, 8),), manifold=manifold, dynamic=dynamic, **options
    )
    _perturb(converted)
    program = _export(converted, "ids", _tokens(2, 8), {}, ("batch", "length"))
    assert _hcpass_ops(program) == []
    _assert_program_computes_converted(program, converted, _tokens, {})


def _run_without_hcpass(script: str, tmp_path: Path) -> str:
    """Run `script` in a fresh Python that must never import hcpass; returns its stdout."""
    check = "\nimport sys\nassert 'hcpass' not in sys.modules, 'hcpass was imported'\n"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script) + check],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: `import hcpass` would not find a source tree
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_saved_program_loads_and_runs_in_a_process_without_hcpass(tmp_path):
    converted = hcpass.convert(tiny_gpt().eval(), (_tokens(2, 8),))  # default sinkhorn
    _perturb(converted)
    program = _export(converted, "ids", _tokens(2, 8), {}, ("batch", "length"))
    torch.export.save(program, tmp_path / "program.pt2")
    ids = _tokens(3, 5)
    torch.save(ids, tmp_path / "ids.pt")
    script = """
        import torch
        program = torch.export.load("program.pt2")
        torch.save(program.module()(torch.load("ids.pt")), "out.pt")
    """
    _run_without_hcpass(script, tmp_path)
    want = converted(ids)
    assert _relative_error(torch.load(tmp_path / "out.pt"), want) <= EXPORT_RTOL
    # and lowers to core ATen like any program
    assert _relative_error(program.run_decompositions().module()(ids), want) <= EXPORT_RTOL


@pytest.mark.slow  # AOTInductor compiles the program's C++: ~1-2 min on 2 cores
def test_aot_inductor_package_builds_loads_and_runs_on_cpu(tmp_path):
    converted = hcpass.convert(tiny_gpt(layers=1).eval(), (_tokens(2, 8),), sinkhorn_iters=3)
    _perturb(converted)
    program = _export(converted, "ids", _tokens(2, 8), {}, ("batch", "length"))
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "model.pt2")
    )
    ids = _tokens(3, 5)
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
        import torch
        runner = torch._inductor.aoti_load_package({package!r})
        torch.save(runner(torch.load("ids.pt")), "out.pt")
    """
    _run_without_hcpass(script, tmp_path)
    got = torch.load(tmp_path / "out.pt")
    assert _relative_error(got, converted(ids)) <= COMPILED_RTOL


class _TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(2)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = x + self.blocks[0](x)
        torch._dynamo.graph_break()
        return x + self.blocks[1](x)


class _BreaksWhenExported(_TwoBlocks):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = x + self.blocks[0](x)
        if torch.compiler.is_exporting():
            torch._dynamo.graph_break()
        return x + self.blocks[1](x)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("model_class", [_TwoBlocks, _BreaksWhenExported])
def test_a_graph_break_is_refused_naming_where_it_is(model_class, strict):
    """_TwoBlocks breaks when converted too; _BreaksWhenExported only under export."""
    converted = hcpass.convert(model_class().eval(), (_tokens(2, 8),), sinkhorn_iters=3)
    source, start = inspect.getsourcelines(model_class.forward)
    line = start + next(i for i, text in enumerate(source) if "graph_break()" in text)
    with pytest.raises(RuntimeError, match="captured as one graph") as error:
        torch.export.export(converted, (_tokens(2, 8),), strict=strict)
    assert re.search(rf'test_export\.py(:|", line ){line}\b', str(error.value))
    assert converted(_tokens(2, 8)).shape == (2, 8, 16)  # the model itself still runs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", zoo(["tiny_gpt", "gpt2", "vit"]))
def test_strict_export_computes_the_converted_model(name, family):
    options = {"sinkhorn_iters": 3} if family == "hyper-connections" else {}
    converted, input_name, make, kwargs, dims = _convert(name, family=family, **options)
    program = _export(converted, input_name, make(2, 8), kwargs, dims, strict=True)
    assert _hcpass_ops(program) == []
    _assert_program_computes_converted(program, converted, make, kwargs)


class _RootParameter(nn.Module):
    """A parameter on the root module: the converted module registers it too."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 16))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(2)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) * self.scale
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_leaves_the_converted_model_as_it_was(strict):
    converted = hcpass.convert(_RootParameter().eval(), (_tokens(2, 8),), sinkhorn_iters=3)
    _perturb(converted)
    ids = _tokens(3, 5)
    before = converted(ids)
    program = _export(converted, "ids", _tokens(2, 8), {}, ("batch", "length"), strict)
    assert type(converted.original.scale) is nn.Parameter
    assert converted.original.scale is converted.scale
    torch.testing.assert_close(converted(ids), before, rtol=0, atol=0)
    assert _relative_error(program.module()(ids), before) <= EXPORT_RTOL
