"""The generated Triton kernels (hcpass.codegen) against the reference ops.

Without a GPU the kernels run in Triton's interpreter, in a worker process: triton 3.x
decides between compiled and interpreted functions when ``@triton.jit`` runs, for its own
library (tl.sum, tl.sigmoid, ...) at ``import triton``, so TRITON_INTERPRET=1 must be set
before triton is imported, and other test modules (anything touching Inductor) may have
imported it in this process already. The worker is spawned with the variable set; the
tests send it cases and get its assertion errors back. `test_kernels_compile_for_sm90`
compiles every kernel, as its launcher calls it on bf16 streams, to an H100 binary without
a GPU; the GPU tests at the end run them.

Tolerance: every output within ``tol * max(1, max|reference|)`` elementwise (plus
``tol`` relative): 1e-5 for fp32 and 1e-11 for fp64 streams. bf16 streams: 1e-2, one bf16
ulp (2^-8 relative) and then some: a differently ordered fp32 sum may round to the
neighbouring bf16, and the boundary kernel's coefficients are computed from its own bf16 X'.
The worker's interpreter rounds fp32 to bf16 to nearest even as a GPU does
(tests/interpreter.py; triton 3.9's truncates). Coefficients stay fp32 and match far tighter.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
import triton
from hcpass.codegen import generate, kernels, register_cuda_kernels

from hcpass.manifolds import create, manifold_names
from hcpass.ops import reference
from tests.interpreter import converts_to_bf16_as_torch
from tests.op_inputs import (
    OP_NAMES,
    boundary_inputs,
    coeffs_inputs,
    saturated_sinkhorn_inputs,
    sinkhorn_fp64_reference,
    stream_inputs,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-11, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def assert_matches(got: object, want: object, tol: float) -> None:
    """Same shapes and dtypes, values within ``tol * max(1, max|want|)`` (+ tol relative)."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape and g.dtype == w.dtype, (index, g.shape, w.shape, g.dtype)
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        message = lambda m, i=index: f"output {i}: {m}"
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol * scale, msg=message)


# ------------------------------------------------------------------------------ cases
def run_stream_case(op: str, n: int, pos: tuple[int, ...], C: int, dtype: torch.dtype) -> None:
    args = stream_inputs(op, n, pos, C, dtype)
    assert_matches(getattr(kernels, op)(*args), getattr(reference, op)(*args), TOL[dtype])


def run_coeffs_case(
    name: str,
    n: int,
    pos: tuple[int, ...],
    C: int,
    dtype: torch.dtype,
    options: dict,
    backward: bool,
) -> None:
    args = coeffs_inputs(name, n, pos, C, dtype, options)
    want = reference.coeffs(*args)
    if backward:
        torch.manual_seed(1)
        grads = tuple(torch.randn_like(w) for w in want)
        got = kernels.coeffs_backward(*grads, *args)
        want = reference.coeffs_backward(*grads, *args)
    else:
        got = kernels.coeffs(*args)
    assert_matches(got, want, TOL[dtype])


def run_boundary_case(
    n: int,
    pos: tuple[int, ...],
    C: int,
    dtype: torch.dtype,
    options: dict,
    manifold: str = "sinkhorn",
) -> None:
    args = boundary_inputs(n, pos, C, dtype, options, manifold)
    got = kernels.post_res_coeffs_pre(*args)
    assert_matches(got, reference.post_res_coeffs_pre(*args), TOL[dtype])


# ------------------------------------------------ in the interpreter (conftest's worker)
def run_bf16_conversions() -> bool:
    """Every fp32 bit pattern class: 4096 random ones (every exponent, subnormals, inf, NaN)
    and as many ties (low 16 bits 0x8000), which truncation and rounding resolve apart."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31, (4096,), generator=gen, dtype=torch.int64)
    ties = (bits & ~0xFFFF) | 0x8000
    values = torch.cat([bits, ties]).to(torch.int32).view(torch.float32)
    return converts_to_bf16_as_torch(values)


def test_interpreter_rounds_bf16_as_a_gpu(interpreter):
    """The worker's interpreter converts fp32 to bf16 to nearest even, as a GPU and torch do
    (tests/interpreter.py patches triton 3.9's truncation), so the bf16 kernels are held to
    the rounding they will do on a GPU."""
    assert interpreter.submit(run_bf16_conversions).result()


# (n, positions, C): non-power-of-two n and C, ragged position counts, 2-d positions.
STREAM_SHAPES = [(2, (7,), 96), (3, (13,), 96), (4, (2, 5), 40), (8, (13,), 96)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", STREAM_SHAPES, ids=str)
@pytest.mark.parametrize("op", ["pre", "pre_backward", "post_res", "post_res_backward"])
def test_stream_kernels(interpreter, op, shape, dtype):
    interpreter.submit(run_stream_case, op, *shape, dtype).result()


# (n, positions, C, sinkhorn options). 37 positions: several blocks of 16 positions, and
# coeffs_backward's dphi reduction split in two.
COEFFS_CASES = [
    (2, (37,), 96, {}),
    (3, (2, 5), 40, {}),
    (4, (13,), 96, {}),
    (8, (7,), 96, {}),
    (4, (7,), 32, {"sinkhorn_iters": 3}),
    (4, (13,), 96, {"dynamic": False}),
    (4, (13,), 40, {"sinkhorn_backward": "implicit"}),  # no Triton epilogue: PyTorch res_map
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", COEFFS_CASES, ids=str)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_coeffs_kernels(interpreter, backward, case, dtype):
    n, pos, C, options = case
    interpreter.submit(run_coeffs_case, "sinkhorn", n, pos, C, dtype, options, backward).result()


# Manifolds with a flat-layout epilogue, at every n it covers, forward and backward.
FLAT_EPILOGUE_CASES = [
    ("kronecker", 1, (7,), 32),
    ("kronecker", 2, (13,), 40),
    ("kronecker", 4, (37,), 32),
    ("kronecker", 8, (7,), 96),
    ("permutation", 1, (7,), 32),
    ("permutation", 2, (13,), 40),
    ("permutation", 3, (37,), 32),
    ("permutation", 4, (13,), 96),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FLAT_EPILOGUE_CASES, ids=str)
def test_flat_epilogues(interpreter, case, dtype):
    """Coefficients forward and backward, and the site boundary."""
    name, n, pos, C = case
    assert create(name, n).triton_res_map() is not None
    for backward in (False, True):
        interpreter.submit(run_coeffs_case, name, n, pos, C, dtype, {}, backward).result()
    interpreter.submit(run_boundary_case, n, pos, C, dtype, {}, name).result()


def test_permutation_epilogue_stops_at_four_streams():
    # n = 5 would hold [BLOCK, 120, 8, 8] in registers: its res_map stays in PyTorch
    assert create("permutation", 5).triton_res_map() is None


@pytest.mark.parametrize("name", manifold_names())
def test_coeffs_every_manifold(interpreter, name):
    """Manifolds without a Triton epilogue run their res_map in PyTorch; one that does not
    use the shared projection (HC) falls back to the reference."""
    for backward in (False, True):
        interpreter.submit(
            run_coeffs_case, name, 4, (13,), 32, torch.float32, {}, backward
        ).result()


# (n, positions, C, sinkhorn options): several blocks of 16 positions, a ragged last one.
BOUNDARY_CASES = [
    (2, (37,), 96, {}),
    (3, (2, 5), 40, {}),
    (4, (13,), 96, {}),
    (8, (7,), 96, {}),
    (4, (13,), 40, {"dynamic": False}),
    (4, (13,), 40, {"sinkhorn_backward": "implicit"}),  # no epilogue: the three launchers
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BOUNDARY_CASES, ids=str)
def test_site_boundary_kernel(interpreter, case, dtype):
    """post_res of site l, coefficients and branch input of site l+1 in one kernel."""
    n, pos, C, options = case
    interpreter.submit(run_boundary_case, n, pos, C, dtype, options).result()


# Sinkhorn's epilogue on its own: [P, n, n] logits in, its vjp out, BLOCK_P positions a program.
SINKHORN_EPILOGUE_KERNEL = """
import triton
import triton.language as tl

{epilogue}


@triton.jit
def sinkhorn_vjp_kernel(logits_ptr, grad_ptr, out_ptr, P, N: tl.constexpr, S: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    i = tl.arange(0, S)
    ij = p[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :]
    ok = (p < P)[:, None, None] & (i < N)[None, :, None] & (i < N)[None, None, :]
    logits = tl.load(logits_ptr + ij, mask=ok, other=0.0)
    grad = tl.load(grad_ptr + ij, mask=ok, other=0.0)
    tl.store(out_ptr + ij, res_map_vjp(logits, grad, N, S), mask=ok)
"""


def run_saturated_sinkhorn_epilogue_case(n: int, iters: int) -> None:
    logits, grad = saturated_sinkhorn_inputs(n, 37, seed=n)
    epilogue = create("sinkhorn", n, sinkhorn_iters=iters).triton_res_map()
    source = SINKHORN_EPILOGUE_KERNEL.format(epilogue=epilogue)
    path = generate._write_once(source, "test_sinkhorn_epilogue")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    got = torch.empty_like(logits)
    block_p, padded = 16, triton.next_power_of_2(n)
    grid = (triton.cdiv(logits.shape[0], block_p),)
    module.sinkhorn_vjp_kernel[grid](logits, grad, got, logits.shape[0], n, padded, block_p)
    _, want = sinkhorn_fp64_reference(logits, grad, iters)
    assert got.isfinite().all()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", range(2, 9))
def test_sinkhorn_epilogue_backward_is_finite_for_saturated_logits(interpreter, n):
    """Logits spanning +-100 (exact zeros after exp, sums below eps at the first steps): the
    epilogue's vjp matches fp64 autograd of the unrolled forward within 1e-5 (its gradients
    are below 1; 5 iterations keep the interpreter fast). Stepping back by dividing by the
    sums overflowed fp32 here."""
    interpreter.submit(run_saturated_sinkhorn_epilogue_case, n, 5).result()


# ------------------------------------------------------------------ generation, no GPU
def test_splice_replaces_the_placeholder_epilogue():
    epilogue = create("sinkhorn", 4, sinkhorn_iters=7).triton_res_map()
    template = (generate.TEMPLATE_DIR / "coeffs_template.py").read_text()
    source = generate.splice(template, epilogue)
    assert "static_assert(False" not in source
    assert source.count("def res_map(") == 1 and "range(1, 7)" in source
    with pytest.raises(ValueError, match="EPILOGUE"):
        generate.splice("def f(): pass\n", epilogue)


@pytest.mark.skipif(generate.interpreted(), reason="triton imported interpreted")
def test_cpu_tensors_need_the_interpreter():
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.pre(x, torch.rand(3, 2))


def test_register_cuda_kernels_is_idempotent():
    register_cuda_kernels()
    register_cuda_kernels()
    for name in kernels.LAUNCHERS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hcpass::{name}", "CUDA"), name
    # CPU calls keep the reference implementation
    x, h = torch.randn(2, 3, 8), torch.rand(3, 2)
    torch.testing.assert_close(torch.ops.hcpass.pre(x, h), reference.pre(x, h))


TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


class _Recorder:
    """Stands in for an autotuned kernel: records each launch's arguments."""

    launches: list[tuple[str, str | None, tuple, dict]] = []

    def __init__(self, name: str, epilogue: str | None) -> None:
        self.name, self.epilogue = name, epilogue

    def __getitem__(self, grid: object):
        return lambda *args, **kwargs: self.launches.append(
            (self.name, self.epilogue, args, kwargs)
        )


def _record_launches(monkeypatch, dtype: torch.dtype) -> list:
    """Every kernel launch of the launchers on bf16 streams (sinkhorn fused and unfused,
    dynamic and static; the flat epilogues of kronecker and permutation), recorded instead
    of run."""
    monkeypatch.setattr(_Recorder, "launches", [])
    monkeypatch.setattr(generate, "kernel", _Recorder)
    monkeypatch.setattr(kernels, "_check_device", lambda *tensors: None)
    n, pos, C = 4, (16,), 256
    for name, options in (
        ("sinkhorn", {}),
        ("sinkhorn", {"dynamic": False}),
        ("sinkhorn", {"sinkhorn_backward": "implicit"}),
        ("kronecker", {}),
        ("permutation", {}),
    ):
        x, phi, alpha, bias, spec = coeffs_inputs(name, n, pos, C, torch.float32, options)
        x = x.to(dtype)
        outs = reference.coeffs(x, phi, alpha, bias, spec)
        kernels.coeffs(x, phi, alpha, bias, spec)
        kernels.coeffs_backward(*(torch.ones_like(o) for o in outs), x, phi, alpha, bias, spec)
        x, y, h_post, h_res, *params = boundary_inputs(n, pos, C, torch.float32, options, name)
        kernels.post_res_coeffs_pre(x.to(dtype), y.to(dtype), h_post, h_res, *params)
    for op in ("pre", "pre_backward", "post_res", "post_res_backward"):
        args = stream_inputs(op, n, pos, C, torch.float32)
        getattr(kernels, op)(*(a.to(dtype) if a.shape[-1] == C else a for a in args))
    return _Recorder.launches


@pytest.mark.skipif(generate.interpreted(), reason="triton imported interpreted")
def test_kernels_compile_for_sm90(monkeypatch):
    """Each kernel, with the arguments its launcher passes for bf16 streams and the first
    autotune config, compiles to an sm_90 (H100) binary -- no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = _record_launches(monkeypatch, torch.bfloat16)
    monkeypatch.undo()
    assert {name for name, *_ in launches} == set(generate.TEMPLATES)
    seen = set()
    for name, epilogue, args, kwargs in launches:
        fn = getattr(generate.load_module(generate.TEMPLATES[name], epilogue), name)
        config = generate.configs(name)[0]
        values = {**dict(zip(fn.arg_names, args, strict=False)), **kwargs, **config.kwargs}
        signature, constants = {}, {}
        for arg in fn.arg_names:
            value = values[arg]
            if isinstance(value, torch.Tensor):
                signature[arg] = "*" + TRITON_TYPES[value.dtype]
            elif arg in kwargs or arg in config.kwargs:
                signature[arg], constants[arg] = "constexpr", value
            else:
                signature[arg] = "i32"
        key = (name, epilogue, tuple(signature.items()), tuple(map(str, constants.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(
            ASTSource(fn, signature, constants),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": config.num_warps},
        )
        assert compiled.asm["cubin"], name


# ---------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _on_cuda(args: tuple, dtype: torch.dtype, C: int) -> tuple:
    """`args` on the GPU, with the stream tensors (last dim C) in `dtype`."""
    moved = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.cuda()
            a = a.to(dtype) if a.shape[-1] == C and a.dim() > 1 else a
        moved.append(a)
    return tuple(moved)


# bf16: outputs round to bf16 (2^-8) after a differently ordered fp32 sum, and the coefficient
# projection runs in tf32 (2^-11), as in the paper. fp32 on the GPU: the same ieee products.
GPU_TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("op", OP_NAMES)
def test_cuda_kernels_match_reference(op, n, dtype):
    pos, C = (3, 345), 1000
    if op == "post_res_coeffs_pre":
        args = _on_cuda(boundary_inputs(n, pos, C, torch.float32, {}), dtype, C)
    elif op.startswith("coeffs"):
        args = _on_cuda(coeffs_inputs("sinkhorn", n, pos, C, torch.float32, {}), dtype, C)
        if op == "coeffs_backward":
            args = (*(torch.randn_like(o) for o in reference.coeffs(*args)), *args)
    else:
        args = _on_cuda(stream_inputs(op, n, pos, C, torch.float32), dtype, C)
    assert_matches(getattr(kernels, op)(*args), getattr(reference, op)(*args), GPU_TOL[dtype])


@pytest.mark.gpu
@needs_cuda
def test_inductor_output_calls_the_generated_kernels():
    from torch._inductor.utils import run_and_get_code
    from torch.profiler import ProfilerActivity, profile

    register_cuda_kernels()
    n, pos, C = 4, (2, 64), 256
    x, phi, alpha, bias, spec = _on_cuda(
        coeffs_inputs("sinkhorn", n, pos, C, torch.float32, {}), torch.bfloat16, C
    )

    def mixer(ops, x, phi, alpha, bias):
        """Two sites, as the hcpass backend lowers them for CUDA (tanh stands in for the
        branches)."""
        h_pre, h_post, h_res = ops.coeffs(x, phi, alpha, bias, spec)
        y = torch.tanh(ops.pre(x, h_pre))
        x, h_pre, h_post, h_res, u = ops.post_res_coeffs_pre(
            x, y, h_post, h_res, phi, alpha, bias, spec
        )
        return ops.post_res(x, torch.tanh(u), h_post, h_res)

    def step(fn):
        leaves = [t.detach().requires_grad_() for t in (x, phi, alpha, bias)]
        out = fn(*leaves)
        out.float().square().sum().backward()
        return (out, *(t.grad for t in leaves))

    compiled = torch.compile(functools.partial(mixer, torch.ops.hcpass))
    got, codes = run_and_get_code(step, compiled)
    code = "\n".join(codes)
    for op in OP_NAMES:
        assert f"torch.ops.hcpass.{op}.default" in code, op
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(compiled)
        torch.cuda.synchronize()
    launched = {event.name for event in prof.events()}
    for name in generate.TEMPLATES:
        assert any(name in kernel for kernel in launched), name
    assert_matches(got, step(functools.partial(mixer, reference)), GPU_TOL[torch.bfloat16])
