"""The CUDA path end to end, on CPU: converted models run forward and backward with every
``hcpass::`` op dispatched to its generated kernel's launcher, in Triton's interpreter, and
compared with the same converted model run eagerly with the ops' own CPU kernels.

How. In the interpreter worker (conftest's `interpreter`: triton imported with
TRITON_INTERPRET=1), each op's CPU kernel is replaced by its launcher, the function
``import hcpass`` registers as the op's CUDA kernel (`hcpass.codegen.LAUNCHERS`); the
interpreter runs the kernels on CPU tensors. Two runs of each converted model then do what
they do on a GPU:

- eager: the rewritten graph as the runtime runs it, the launchers under the ops' autograd;
- compiled: ``torch.compile(converted, backend="hcpass")`` with the backend lowering every
  graph as for CUDA inputs (`pass_plan(cuda=True)`: the site boundaries fused into
  ``post_res_coeffs_pre``; Block AttnRes's phase 1 once per block for all its depth
  attentions, ``attnres_blocks``, each attention an ``attnres_merge``), then AOTAutograd
  with Inductor's decompositions and min-cut partitioner; the forward and backward graphs
  it makes run as FX graphs, so the ops they call reach the launchers. Left out: Inductor's
  code generation for the rest of the graph, where the ops stay extern calls
  (`test_inductor_runs_the_launchers`, slow, runs it too).

The reference is the same converted model, eager, with each op's own CPU kernel (its
`set_kernel_enabled("cpu", False)`). Compared: the output and the gradient of every
parameter (the model's and the mixers', moved off their init) of ``sum(out * w)`` for a
fixed random ``w``. Tolerance as in the kernel tests (tests/test_codegen.py): every value
within ``tol * max(1, max|reference|)`` (plus ``tol`` relative): fp32 1e-5; bf16 1e-2 for the
eager run against the reference, and every run (the reference's too) within GPU_BF16_TOL of
the fp32 run of the same model (`run_case`). The interpreter worker rounds fp32 to bf16 to
nearest even, as a GPU does (tests/interpreter.py; triton 3.9's interpreter truncates, which
took the eager bf16 runs of HC and AttnRes models past 1e-2 of the reference).
Each run also counts the launches, so a run that never reached a kernel, or a boundary left
unfused, fails.

The interpreter runs a program instance in ~1 ms and a case costs 5-20 s on 2 cores, mostly
Dynamo and AOTAutograd: the default cases cover each model, static and dynamic mixers,
n = 2 and 4, C = 24 (not a power of two), odd position counts (7, 15) and bf16 (HC, full
and Block AttnRes); every manifold, static at n = 2 and dynamic at n = 4, and Inductor are
marked slow.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from hcpass.codegen import LAUNCHERS, generate, register_interpreted_cpu_kernels
from torch._dynamo.utils import counters

import hcpass
import hcpass.lowering.backend as backend
from hcpass.ops import library
from hcpass.ops.attnres import library as attnres_library
from tests import models
from tests.op_inputs import coeffs_inputs

OPS = torch.ops.hcpass
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# bf16 against fp32: the bound of the GPU kernel tests (tests/test_codegen.py)
GPU_BF16_TOL = 2e-2
HC_FORWARD = ("coeffs", "pre", "post_res")
HC_BACKWARD = ("coeffs_backward", "pre_backward", "post_res_backward")
ATTNRES = ("attnres", "attnres_backward")
# Block AttnRes compiled: phase 1 once per block, phase 2 per depth attention
ATTNRES_PHASES = (
    "attnres_blocks",
    "attnres_blocks_backward",
    "attnres_merge",
    "attnres_merge_backward",
)
# the op definitions, whose CPU kernels the worker replaces
OP_DEFS = {
    name: getattr(library, name, None) or getattr(attnres_library, name) for name in LAUNCHERS
}


@dataclass(frozen=True)
class Case:
    """A converted model: which (`model`: gpt, checkpointed_gpt, llama), its size, the input's
    batch and length (positions = batch * length), and how it is converted."""

    model: str = "gpt"
    layers: int = 2
    width: int = 32
    batch: int = 2
    length: int = 8
    dtype: torch.dtype = torch.float32
    family: str = "hyper-connections"
    streams: int = 4
    manifold: str = "sinkhorn"
    options: tuple[tuple[str, object], ...] = (("sinkhorn_iters", 4),)

    def __str__(self) -> str:
        if self.family == "attnres":
            block = dict(self.options).get("block_size")
            mixing = ["attnres", f"block{block}" if block else "full"]
        else:
            mixing = [self.manifold, f"n{self.streams}", *(f"{k}={v}" for k, v in self.options)]
        dtype = str(self.dtype).removeprefix("torch.")
        size = [f"{self.model}{self.layers}", f"C{self.width}", f"P{self.batch * self.length}"]
        return "-".join([*size, dtype, *mixing])


def hc(manifold: str, streams: int, dynamic: bool, **more) -> Case:
    """A 1-layer GPT (two sites: one fused boundary) with C = 24 and 7 positions for static
    mixers, C = 32 and 2 x 8 for dynamic ones."""
    options = {"dynamic": dynamic, **more}
    if manifold == "sinkhorn":
        options.setdefault("sinkhorn_iters", 4)
    size = dict(width=32, batch=2, length=8) if dynamic else dict(width=24, batch=1, length=7)
    return Case(
        layers=1, streams=streams, manifold=manifold, options=tuple(options.items()), **size
    )


# -------------------------------------------------------------------- in the worker
_LAUNCHED: Counter[str] = Counter()


@functools.cache
def _launchers_as_cpu_kernels() -> None:
    """Make each op's CPU kernel its launcher, counting the launches (once per worker)."""
    register_interpreted_cpu_kernels({name: _counted(name, f) for name, f in LAUNCHERS.items()})


def _counted(name: str, launcher):
    @functools.wraps(launcher)
    def launch(*args):
        _LAUNCHED[name] += 1
        return launcher(*args)

    return launch


@contextlib.contextmanager
def _own_cpu_kernels() -> Iterator[None]:
    """The ops' own CPU kernels (references, C++ stream kernels): the reference run."""
    with contextlib.ExitStack() as stack:
        for op in OP_DEFS.values():
            stack.enter_context(op.set_kernel_enabled("cpu", False))
        yield


_INDUCTOR = backend._compile_fx


def _aot_graphs_run_as_fx(gm, example_inputs, passes):
    """Inductor's AOTAutograd step (decompositions, min-cut partitioner), graphs run as FX
    (the CUDA plan has no Inductor hooks: `passes` needs nothing here)."""
    from torch._dynamo.backends.debugging import aot_eager_decomp_partition

    return aot_eager_decomp_partition(gm, list(example_inputs))


@contextlib.contextmanager
def _cuda_lowering(compile_fx=_aot_graphs_run_as_fx) -> Iterator[None]:
    """backend="hcpass" lowering every graph as it does for CUDA inputs."""
    with (
        mock.patch.object(backend, "_on_cuda", lambda example_inputs: True),
        mock.patch.object(backend, "_compile_fx", compile_fx),
    ):
        yield


def _build(case: Case) -> tuple[torch.nn.Module, tuple]:
    (ids,), _ = models.token_inputs(case.batch, case.length)
    if case.model == "gpt":
        model = models.tiny_gpt(width=case.width, layers=case.layers)
    elif case.model == "checkpointed_gpt":
        model = models.CheckpointedGPT(reentrant=False, layers=case.layers)
    elif case.model == "llama":
        model = models.llama()
    else:
        raise ValueError(case.model)
    return model.to(case.dtype), (ids,)


def _convert(case: Case) -> tuple[hcpass.ConvertedModule, tuple]:
    torch.manual_seed(0)
    model, inputs = _build(case)
    if case.family == "attnres":
        converted = hcpass.convert(model, inputs, family="attnres", **dict(case.options))
    else:
        converted = hcpass.convert(
            model, inputs, streams=case.streams, manifold=case.manifold, **dict(case.options)
        )
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for p in converted.mixers.parameters():
            p.add_((0.1 * torch.randn(p.shape, generator=gen)).to(p.dtype))
    return converted, inputs


def _values_and_gradients(model, inputs: tuple, params: list) -> list[torch.Tensor | None]:
    out = models.logits(model(*inputs))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    loss = (out.float() * weights).sum()
    return [out, *torch.autograd.grad(loss, params, allow_unused=True)]


def _worst_error(got: list, want: list, names: list[str], tol: float) -> float:
    """The largest error over all tensors, each in units of ``max(1, max|want|)``; raises
    where one is beyond `tol` (a NaN included)."""
    worst = 0.0
    for name, g, w in zip(names, got, want, strict=True):
        assert (g is None) == (w is None), name
        if w is None:
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape)
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(
            g.double(), w.double(), rtol=tol, atol=tol * scale, msg=lambda m, n=name: f"{n}: {m}"
        )
        if w.numel():
            worst = max(worst, ((g.double() - w.double()).abs().max() / scale).item())
    return worst


def _expected_launches(case: Case, sites: int, compiled: bool) -> dict[str, int] | None:
    """The launches of one forward and backward of a model with one chain of `sites` sites
    and no checkpoint region (None for the others): eagerly three forward ops per site;
    compiled, every boundary fused; the backward runs three backward ops per site."""
    if case.family == "attnres" or case.model == "checkpointed_gpt":
        return None
    backward = dict.fromkeys(HC_BACKWARD, sites)
    if not compiled:
        return {**dict.fromkeys(HC_FORWARD, sites), **backward}
    return {**dict.fromkeys(HC_FORWARD, 1), "post_res_coeffs_pre": sites - 1, **backward}


def _own_run(model, inputs: tuple) -> list:
    params = [p for p in model.parameters() if p.requires_grad]
    with _own_cpu_kernels():
        _LAUNCHED.clear()
        values = _values_and_gradients(model, inputs, params)
        assert not _LAUNCHED, f"the reference run launched {dict(_LAUNCHED)}"
    return values


def run_case(case: Case, inductor: bool = False) -> dict[str, float]:
    """The eager and compiled runs on the launchers against the reference: their worst
    errors; for a bf16 model, each run's and the reference's own against the fp32 run, and
    the eager run's against the reference (`inductor`: compiled by Inductor, not run as FX
    graphs)."""
    _launchers_as_cpu_kernels()
    converted, inputs = _convert(case)
    names = ["output"] + [n for n, p in converted.named_parameters() if p.requires_grad]
    params = [p for p in converted.parameters() if p.requires_grad]
    reference = want = _own_run(converted, inputs)
    tol = TOL[case.dtype]
    errors = {}
    if case.dtype != torch.float32:
        # Two bf16 computations of a model differ by bf16 rounding through it, as much as the
        # kernel tests' bound: the reference and both runs are held to the fp32 run of the
        # same (rounded) parameters, within GPU_BF16_TOL. The eager run is the reference's
        # graph with the launchers for the CPU kernels: also held to the reference at the
        # kernel tests' bound (with the interpreter rounding to nearest, within 3e-7 of it in
        # these cases; truncating, up to 0.016 off).
        want = _own_run(copy.deepcopy(converted).float(), inputs)
        want = [w if w is None else w.to(r.dtype) for w, r in zip(want, reference, strict=True)]
        errors["reference"] = _worst_error(reference, want, names, GPU_BF16_TOL)
        tol = GPU_BF16_TOL
    torch._dynamo.reset()
    compile_fx = _INDUCTOR if inductor else _aot_graphs_run_as_fx
    compiled = torch.compile(converted, backend="hcpass")
    for path, model in (("eager", converted), ("compiled", compiled)):
        _LAUNCHED.clear()
        counters.clear()
        with _cuda_lowering(compile_fx):
            got = _values_and_gradients(model, inputs, params)
        _check_launches(case, path, dict(_LAUNCHED), len(converted.mixers))
        errors[path] = _worst_error(got, want, names, tol)
        if path == "eager" and case.dtype != torch.float32:
            errors["eager-vs-reference"] = _worst_error(got, reference, names, TOL[case.dtype])
    return errors


def _attention_blocks(case: Case) -> list[int]:
    """How many depth attentions each block of a GPT converted to Block AttnRes has: its
    ``2 * layers`` sites give depth attentions 1..2L (the first site reads the embedding
    alone; attention 2L is the output norm's), and attention a reads the blocks completed
    before block ``(a - 1) // block_size``."""
    block = dict(case.options).get("block_size")
    if block is None:  # full AttnRes: every attention over blocks of its own
        return [1] * 2 * case.layers
    return list(Counter((a - 1) // block for a in range(1, 2 * case.layers + 1)).values())


def _check_attnres_launches(case: Case, path: str, launched: dict[str, int]) -> None:
    """Eagerly, one attnres call per depth attention; compiled, phase 1 once for each block
    of two or more attentions (`BatchBlockAttention` batched every one), the rest as one
    attnres call each."""
    blocks = _attention_blocks(case)
    batched = sum(size >= 2 for size in blocks)
    if path == "eager":
        assert set(launched) == set(ATTNRES), (path, launched)
        return
    hcpass_counts = dict(counters["hcpass"])
    assert hcpass_counts.get("attnres_batched", 0) == batched, hcpass_counts
    assert "attnres_unbatched" not in hcpass_counts, hcpass_counts
    expected = {*(ATTNRES_PHASES if batched else ()), *(ATTNRES if min(blocks) < 2 else ())}
    assert set(launched) == expected, (path, launched)
    # phase 1 runs once per block forward and once backward: never once per attention
    assert launched.get("attnres_blocks", 0) == batched, (path, launched)
    assert launched.get("attnres_blocks_backward", 0) == batched, (path, launched)


def _check_launches(case: Case, path: str, launched: dict[str, int], sites: int) -> None:
    expected = _expected_launches(case, sites, path == "compiled")
    if expected is not None:
        assert launched == expected, (path, launched, expected)
    elif case.family == "attnres":
        _check_attnres_launches(case, path, launched)
    else:
        fused = {"post_res_coeffs_pre"} if path == "compiled" else set()
        assert set(launched) == {*HC_FORWARD, *HC_BACKWARD, *fused}, (path, launched)


# ------------------------------------------------------------------------------- cases
CASES = [
    Case(),  # the demo GPT, 2 layers: 4 sites, 3 fused boundaries
    hc("kronecker", 2, False),  # 7 positions, C = 24
    Case(dtype=torch.bfloat16),
    Case(model="checkpointed_gpt"),
    pytest.param(
        Case(model="llama", streams=2, manifold="spectral", options=(("dynamic", True),)),
        marks=pytest.mark.hf,
    ),
    Case(family="attnres", batch=3, length=5, width=24, options=()),
    Case(family="attnres", batch=1, length=7, options=(("block_size", 2),)),
    # blocks of 3 sites: one block of 3 depth attentions (S = 3) and one of 1 (unbatched)
    Case(family="attnres", batch=3, length=5, width=24, options=(("block_size", 3),)),
    Case(family="attnres", batch=3, length=5, width=24, options=(), dtype=torch.bfloat16),
    # bf16, a batched block (S = 3)
    Case(
        family="attnres",
        batch=3,
        length=5,
        width=24,
        options=(("block_size", 3),),
        dtype=torch.bfloat16,
    ),
    hc("hc", 4, False),
]
# every manifold, with static mixers at n = 2 (C = 24, 7 positions) and dynamic ones at n = 4
EVERY_MANIFOLD = [
    hc(name, streams, dynamic, **more)
    for name, more in (
        ("sinkhorn", {}),
        ("sinkhorn", {"sinkhorn_backward": "implicit"}),
        ("kronecker", {}),
        ("permutation", {}),
        ("hc", {}),
        ("spectral", {}),
        ("stiefel", {}),
        ("grassmann", {}),
    )
    for streams, dynamic in ((2, False), (4, True))
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_path_matches_eager_reference(interpreter, case):
    errors = interpreter.submit(run_case, case).result()
    print(f"worst error in units of max(1, max|reference|): {errors}")  # pytest -rP shows it


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [Case(streams=2, batch=3, length=5, width=24, options=())]  # Sinkhorn's 20 iterations
    + [c for c in EVERY_MANIFOLD if str(c) not in map(str, CASES)],
    ids=str,
)
def test_cuda_path_every_manifold(interpreter, case):
    interpreter.submit(run_case, case).result()


@pytest.mark.slow
def test_inductor_runs_the_launchers(interpreter):
    """As the GPU runs it: Inductor compiles the graph around the ops (here to C++) and calls
    them as extern kernels, whose outputs it checks against the fake kernels' strides."""
    interpreter.submit(run_case, Case(), inductor=True).result()


def run_under_autocast(name: str) -> None:
    """The coefficient ops of `name` on the launchers give the same dtypes and bits under bf16
    autocast as without it (HC's coefficients and a PyTorch H_res map are torch ops inside
    the launchers, which a custom op's kernel runs under the caller's autocast)."""
    _launchers_as_cpu_kernels()
    x, phi, alpha, bias, spec = coeffs_inputs(name, 4, (7,), 24, torch.float32, {})
    y = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(3))
    coefficients = OPS.coeffs(x, phi, alpha, bias, spec)
    calls = {
        "coeffs": lambda: OPS.coeffs(x, phi, alpha, bias, spec),
        "coeffs_backward": lambda: OPS.coeffs_backward(*coefficients, x, phi, alpha, bias, spec),
        "post_res_coeffs_pre": lambda: OPS.post_res_coeffs_pre(
            x, y, coefficients[1], coefficients[2], phi, alpha, bias, spec
        ),
    }
    for op, call in calls.items():
        want = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call()
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, op=op: f"{op}: {m}")


@pytest.mark.parametrize("name", ["hc", "spectral"])
def test_launchers_run_without_autocast(interpreter, name):
    interpreter.submit(run_under_autocast, name).result()


def test_import_registers_the_cuda_kernels():
    """``import hcpass`` alone makes the launchers the ops' CUDA kernels (a converted model
    run eagerly on CUDA calls the ops without going through the backend); checked in a fresh
    process, on the dispatcher, no device needed."""
    names = sorted(LAUNCHERS)
    code = (
        "import torch, hcpass; "
        f"print([n for n in {names!r} "
        "if not torch._C._dispatch_has_kernel_for_dispatch_key(f'hcpass::{n}', 'CUDA')])"
    )
    missing = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout.strip()
    assert missing == "[]"


@pytest.mark.skipif(generate.interpreted(), reason="triton imported interpreted")
def test_cpu_kernels_need_the_interpreter():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        register_interpreted_cpu_kernels()
