"""A residual chain split across graphs keeps its n streams (hcpass.runtime.handoff).

Graph breaks between blocks -- an explicit `graph_break()`, every FSDP2 `fully_shard`ed
block call -- split a converted model's forward into several graphs. The converted model must
compute what it computes without the breaks: same outputs and gradients (≤ 1e-6, float32
rounding of the gradient's split through the collapsed stream), and same parameters after
training (≤ 1e-5 under FSDP2, whose reduce-scatter sums in another order). DDP's gradient
buckets, which would have Dynamo split a graph into pieces, split nothing.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import hcpass
from hcpass.tools.demo.gpt import GPT
from tests import models

# Each test here runs ranks in processes of their own; under pytest-xdist they share one
# worker (`--dist loadgroup`), so two tests' ranks never compete for the cores.
pytestmark = pytest.mark.xdist_group("ranks")


class BrokenGPT(GPT):
    """The tiny GPT with a graph break after every block (Dynamo traces each block alone)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
            torch._dynamo.graph_break()
        return self.head(self.ln(x))


class DetourGPT(GPT):
    """The tiny GPT; once `detour` is set it copies the stream between blocks behind a break."""

    detour = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
            if self.detour:
                torch._dynamo.graph_break()
                x = x.clone()
        return self.head(self.ln(x))


def _convert(model: torch.nn.Module, ids: torch.Tensor) -> hcpass.ConvertedModule:
    """Convert with the paper init and mixed-up biases, so the n streams differ and a chain
    cut at a break (collapse, then n fresh copies) would change the output."""
    converted = hcpass.convert(model, (ids,), streams=4, init="paper")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in converted.mixers.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return converted


def _pair() -> tuple[hcpass.ConvertedModule, hcpass.ConvertedModule, torch.Tensor]:
    """The same converted tiny GPT without and with graph breaks between its blocks."""
    ids = models.token_inputs()[0][0]
    plain = models.tiny_gpt()
    broken = BrokenGPT(models.GPT_CONFIG)
    broken.load_state_dict(plain.state_dict())
    return _convert(plain, ids), _convert(broken, ids), ids


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    out = model(ids)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_a_chain_keeps_its_streams_across_graph_breaks():
    whole, split, ids = _pair()
    rows = [(s.name, s.reason) for s in split.report.rewritten]
    assert rows == [
        ("blocks.0.attn", ""),
        ("blocks.0.mlp", ""),
        ("blocks.1.attn", "continues the chain of blocks.0.mlp across a graph break "
         "(its n streams are handed over)"),
        ("blocks.1.mlp", ""),
    ]  # fmt: skip
    # Each block in a graph of its own, the second right after the first (Dynamo may put
    # the embedding in a graph before them).
    first, *others = [s.graph for s in split.report.rewritten]
    assert others == [first, first + 1, first + 1]
    # Site positions continue across the break: the paper init (which depends on them)
    # gives both models the same mixers.
    for key, value in whole.mixers.state_dict().items():
        assert torch.equal(value, split.mixers.state_dict()[key]), key

    out, grads = _grads(whole, ids)
    split_out, split_grads = _grads(split, ids)
    torch.testing.assert_close(split_out, out, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=0, atol=1e-6, msg=name)


def test_a_stream_replaced_between_graphs_is_an_error():
    ids = models.token_inputs()[0][0]
    # converted as one graph: one chain of 4 sites
    converted = _convert(DetourGPT(models.GPT_CONFIG), ids)
    converted.original.detour = True  # now a break and a copy between the blocks
    with pytest.raises(RuntimeError, match=r"site 'blocks\.1\.attn' continues the residual chain"):
        converted(ids)


# ------------------------------------------------------------------ FSDP2 and DDP
STEPS = 3
WORLD = 2
DDP_WIDTH = 256  # 6 MB of parameters: several of DDP's gradient buckets


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(1, models.VOCAB, (2 * WORLD, 9), generator=generator) for _ in range(3)]


def _train(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for batch in batches:
        logits = models.logits(model(batch[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    with _process_group(rank, port):
        torch.manual_seed(0)
        converted = _convert(models.tiny_gpt(), models.token_inputs()[0][0])
        for block in converted.blocks:
            fully_shard(block)
        fully_shard(converted)
        share = len(_batches()[0]) // WORLD
        _train(converted, [b[rank * share : (rank + 1) * share] for b in _batches()])
        params = {n: p.full_tensor() for n, p in converted.named_parameters()}
        if rank == 0:
            torch.save(params, out)


@contextlib.contextmanager
def _process_group(rank: int, port: int) -> Iterator[None]:
    """The ranks' gloo group over TCP. Ranks that finish their work meet at a barrier before
    the teardown: rank 0 hosts the store, and a rank still completing its last collective
    when rank 0 exited was aborted (SIGABRT: "terminate called without an active
    exception"; seen in CI under load)."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(target, *args) -> None:
    port = _free_port()
    context = multiprocessing.get_context("spawn")
    env = {"TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")}
    os.environ.update({k: v for k, v in env.items() if v})
    ranks = [context.Process(target=target, args=(r, port, *args)) for r in range(WORLD)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)
    stuck = [p for p in ranks if p.is_alive()]
    for p in stuck:
        p.kill()
    assert not stuck, "a rank did not finish within 300 s"
    assert all(p.exitcode == 0 for p in ranks), [p.exitcode for p in ranks]


def test_fsdp2_per_block_and_root_trains_like_one_process(tmp_path: Path):
    out = str(tmp_path / "params.pt")
    _run_ranks(_fsdp_worker, out)

    torch.manual_seed(0)
    reference = _convert(models.tiny_gpt(), models.token_inputs()[0][0])
    _train(reference, _batches())
    sharded = torch.load(out)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(sharded[name], param.detach(), rtol=0, atol=1e-5, msg=name)


def _ddp_worker(rank: int, port: int, out: str, compiled: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel

    with _process_group(rank, port):
        torch.manual_seed(0)
        converted = _convert(models.tiny_gpt(width=DDP_WIDTH), models.token_inputs()[0][0])
        # 1 MB buckets (DDP's first is 1 MB): ~6 for the 6 MB of parameters, so Dynamo's
        # DDPOptimizer would split each graph it compiles at their boundaries.
        model = DistributedDataParallel(converted, bucket_cap_mb=1)
        if compiled:
            model = torch.compile(model, backend="hcpass")
        share = len(_batches()[0]) // WORLD
        _train(model, [b[rank * share : (rank + 1) * share] for b in _batches()])
        if rank == 0:
            torch.save(dict(converted.named_parameters()), out)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ddp_with_several_buckets_trains_like_one_process(tmp_path: Path, compiled: bool):
    """DDP's gradient buckets must not split a converted forward: the runtime's own capture,
    and `backend="hcpass"`, compile one graph per frame where Dynamo would hand each bucket's
    piece to the backend (their chains and mixers cut apart: every site ran without its mixer)."""
    out = str(tmp_path / "params.pt")
    _run_ranks(_ddp_worker, out, compiled)
    torch.manual_seed(0)
    reference = _convert(models.tiny_gpt(width=DDP_WIDTH), models.token_inputs()[0][0])
    _train(reference, _batches())
    trained = torch.load(out)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(trained[name], param.detach(), rtol=0, atol=1e-5, msg=name)


# ------------------------------------------------------------------- tensor parallel
def _tensor_parallel(model: torch.nn.Module, mesh) -> None:
    """torchtitan's plan for a Llama: attention heads and MLP hidden units split across
    ranks (column-wise in, row-wise out); each block returns a plain, replicated tensor."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {f"self_attn.{name}": ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj")}
    plan["self_attn.o_proj"] = RowwiseParallel()
    plan |= {"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel()}
    plan["mlp.down_proj"] = RowwiseParallel()
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)


def _gathered(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def _trained_mixers_and_grads(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict:
    """Train on `batches`, then one more backward at another sequence length (compiled: a
    recompile): every parameter and the mixers' gradients (DTensors gathered)."""
    _train(model, batches)
    models.logits(model(batches[0][:, :-3])).square().mean().backward()
    converted = getattr(model, "_orig_mod", model)
    return {
        "params": {n: _gathered(p) for n, p in converted.named_parameters()},
        "grads": {n: _gathered(p.grad) for n, p in converted.mixers.named_parameters()},
    }


def _tensor_parallel_worker(rank: int, port: int, out: str, order: str, compiled: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    with _process_group(rank, port):
        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(0)
        model = models.llama(kv_heads=WORLD)
        ids = _batches()[0][:, :-1]  # the training shape: one compile under backend="hcpass"
        if order == "parallelize-then-convert":
            _tensor_parallel(model, mesh)
            converted = _convert(model, ids)
        else:
            converted = _convert(model, ids)
            _tensor_parallel(converted, mesh)
        run = torch.compile(converted, backend="hcpass") if compiled else converted
        result = _trained_mixers_and_grads(run, _batches())  # every rank sees every batch
        if rank == 0:
            torch.save(result, out)


@pytest.mark.hf
@pytest.mark.parametrize(
    "order, compiled",
    [
        ("parallelize-then-convert", False),
        ("convert-then-parallelize", False),
        pytest.param("parallelize-then-convert", True, marks=pytest.mark.slow),
        pytest.param("convert-then-parallelize", True, marks=pytest.mark.slow),
    ],
    ids=[
        "parallelize-convert",
        "convert-parallelize",
        "parallelize-convert-compiled",
        "convert-parallelize-compiled",
    ],
)
def test_tensor_parallel_trains_like_one_process(tmp_path: Path, order: str, compiled: bool):
    """A model whose parameters are already DTensors converts (capture crashed reading their
    storage) and trains like one process, mixer gradients included (<= 1e-5). Compiled, the
    last backward at a second sequence length recompiles (with dynamic sizes torch 2.13
    failed there with RecursionError, the plain tensor-parallel model too)."""
    out = str(tmp_path / "result.pt")
    _run_ranks(_tensor_parallel_worker, out, order, compiled)
    _assert_trained_like_one_process(torch.load(out))


def _assert_trained_like_one_process(got: dict) -> None:
    torch.manual_seed(0)
    reference = _convert(models.llama(kv_heads=WORLD), _batches()[0][:, :-1])
    want = _trained_mixers_and_grads(reference, _batches())
    for name, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=1e-5, msg=name)
    for name, param in want["params"].items():
        torch.testing.assert_close(got["params"][name], param, rtol=0, atol=1e-5, msg=name)


def _fsdp_tensor_parallel_worker(
    rank: int, port: int, out: str, mesh_shape: tuple[int, int], compiled: bool
) -> None:
    """TP over the mesh's "tp" dimension, convert, then FSDP2 over its "dp" dimension (each
    block, then the converted root, which holds the mixers); each dp rank trains on its
    share of every batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with _process_group(rank, port):
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "tp"))
        torch.manual_seed(0)
        model = models.llama(kv_heads=WORLD)
        _tensor_parallel(model, mesh["tp"])
        converted = _convert(model, _batches()[0][:, :-1])
        for layer in converted.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(converted, mesh=mesh["dp"])
        run = torch.compile(converted, backend="hcpass") if compiled else converted
        share = len(_batches()[0]) // mesh_shape[0]
        start = mesh["dp"].get_local_rank() * share
        result = _trained_mixers_and_grads(run, [b[start : start + share] for b in _batches()])
        if rank == 0:
            torch.save(result, out)


@pytest.mark.hf
@pytest.mark.parametrize(
    "mesh_shape, compiled",
    [
        ((2, 1), False),
        ((1, 2), False),
        pytest.param((2, 1), True, marks=pytest.mark.slow),
        pytest.param((1, 2), True, marks=pytest.mark.slow),
    ],
    ids=["dp2-tp1", "dp1-tp2", "dp2-tp1-compiled", "dp1-tp2-compiled"],
)
def test_tensor_parallel_then_convert_then_fsdp2_trains_like_one_process(
    tmp_path: Path, mesh_shape: tuple[int, int], compiled: bool
):
    """2-D parallelism (FSDP2 x TP on a 2-D mesh of the 2 ranks): mixer gradients and
    trained parameters within 1e-5 of one process."""
    out = str(tmp_path / "result.pt")
    _run_ranks(_fsdp_tensor_parallel_worker, out, mesh_shape, compiled)
    _assert_trained_like_one_process(torch.load(out))


def _fully_sharded_worker(rank: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with _process_group(rank, port):
        mesh = init_device_mesh("cpu", (WORLD,))
        ids = models.token_inputs()[0][0]
        blocks_only = models.tiny_gpt()
        for block in blocks_only.blocks:
            fully_shard(block, mesh=mesh)
        with pytest.raises(
            ValueError,
            match=r"submodule 'blocks\.0' sharded by FSDP2's fully_shard: convert before",
        ):
            hcpass.convert(blocks_only, (ids,))
        whole = fully_shard(models.tiny_gpt(), mesh=mesh)
        for check in (hcpass.convert, hcpass.explain):
            with pytest.raises(
                ValueError, match="root module sharded by FSDP2's fully_shard: convert before"
            ):
                check(whole, (ids,))


def test_a_model_sharded_with_fully_shard_is_refused_at_convert():
    """fully_shard, then convert: refused, saying to convert first (it left no sites, with
    the reason that no branch reads a parameter: FSDP2 swaps in gathered copies of them)."""
    _run_ranks(_fully_sharded_worker)


def _distributed_stream_worker(rank: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    with _process_group(rank, port):
        mesh = init_device_mesh("cpu", (WORLD,))
        model = distribute_module(models.PreNormStack(), mesh)  # every parameter replicated
        x = DTensor.from_local(torch.randn(2, 5, 16), mesh, [Replicate()])
        with pytest.raises(ValueError, match="the residual is a DTensor"):
            hcpass.convert(model, (x,))


def test_a_residual_stream_kept_as_dtensor_is_refused_at_convert():
    """The mixer ops have no DTensor rules: such a model converted, then its first call
    failed inside hcpass.coeffs ("got mixed torch.Tensor and DTensor")."""
    _run_ranks(_distributed_stream_worker)


# ------------------------------------------------------------------- regional compile
def test_regional_compile_trains_like_the_eager_converted_model():
    """The torchtitan pattern: each block compiled on its own (one graph, reused for every
    block), with both spellings: ``block.compile()`` and ``torch.compile(block)`` put back."""
    torch.manual_seed(0)
    reference = _convert(models.tiny_gpt(), models.token_inputs()[0][0])
    torch.manual_seed(0)
    regional = _convert(models.tiny_gpt(), models.token_inputs()[0][0])
    regional.blocks[0].compile(backend="hcpass")
    regional.blocks[1] = torch.compile(regional.blocks[1], backend="hcpass")
    _train(reference, _batches())
    _train(regional, _batches())
    trained = {n.replace("_orig_mod.", ""): p for n, p in regional.named_parameters()}
    for name, param in reference.named_parameters():
        torch.testing.assert_close(trained[name], param, rtol=0, atol=1e-5, msg=name)


def test_sites_outside_hcpass_compiled_regions_are_an_error():
    ids = models.token_inputs()[0][0]
    converted = _convert(models.tiny_gpt(), ids)
    # blocks.0 is compiled by a backend that knows no mixers; blocks.1 is not compiled.
    converted.blocks[0].compile(backend="eager")
    with pytest.raises(RuntimeError, match=r"0 of 4 mixer runs happened with compiled regions"):
        converted(ids)
